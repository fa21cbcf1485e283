"""Demo of the model API: the seed's default GLA model, batch forward and streaming decode,
both checked against the same weights run by the pure-PyTorch reference in float64.

Called by `python -m gla_ext demo` (gla_ext/__main__.py) as gla_ext.demo.run_demo().
"""
from __future__ import annotations

import time

import torch

from . import _ext
from .model import GLA
from .ops import resolve_backend

__all__ = ["run_demo", "best_device"]

SEED_OPTIONS = dict(embed_dim=287, hidden_size=256, num_layers=6, num_heads=4)

# Max relative error allowed against the float64 reference, per output vector. The ops
# promise 1e-5 (CPU) / 1e-3 (GPU) in float32; six blocks of matmuls and norms add a little.
TOLERANCE = {"cpu": 1e-4, "cuda": 2e-3}


def best_device() -> torch.device:
    """CUDA when a GPU is there and the extension has CUDA kernels, else the CPU."""
    if torch.cuda.is_available() and _ext.has_cuda():
        return torch.device("cuda")
    return torch.device("cpu")


def _max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest ||out - ref|| / ||ref|| over the output vectors (last dim)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode(model: GLA, x: torch.Tensor) -> torch.Tensor:
    """Streams x [B, T, E] through step() one position at a time; returns [B, T, hidden]."""
    state = model.init_state(x.shape[0], device=x.device)
    outs = []
    for t in range(x.shape[1]):
        y_t, state = model.step(x[:, t], state)
        outs.append(y_t)
    return torch.stack(outs, 1)


def _time_ms(fn, device: torch.device, repeats: int) -> float:
    fn()                                         # warm-up (first-call allocation, kernel load)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3 / repeats


def run_demo(batch: int = 4, repeats: int = 5, seed: int = 0) -> int:
    """Builds, runs, checks and times the default model; returns 0 when every check passes, else 1."""
    torch.manual_seed(seed)
    device = best_device()
    model = GLA.build(**SEED_OPTIONS).to(device).eval()
    # Same weights on the pure-PyTorch oracle, in float64 on the CPU.
    ref = GLA.build(**SEED_OPTIONS, backend="reference").double().eval()
    ref.load_state_dict(model.state_dict())

    T = model.window_size                        # the expected sequence length, 60
    x = torch.randn(batch, T, model.embed_dim, device=device)
    backend = resolve_backend("auto", device, x.dtype, "demo")
    print(f"gla_ext demo: GLA.build({', '.join(f'{k}={v}' for k, v in SEED_OPTIONS.items())})")
    print(f"  device {device}, ops backend '{backend}', extension loaded: {_ext.loaded()}")

    n_params = sum(p.numel() for p in model.parameters())
    expected = GLA.param_count(**SEED_OPTIONS)
    params_ok = n_params == expected
    print(f"  parameters: {n_params:,} (GLA.param_count: {expected:,}) "
          f"{'match' if params_ok else 'MISMATCH'}")

    with torch.no_grad():
        y = model(x)
        seq = model(x, return_sequence=True)
        streamed = _decode(model, x)
        ref_seq = ref(x.double().cpu(), return_sequence=True)
        forward_ms = _time_ms(lambda: model(x), device, repeats)
        decode_ms = _time_ms(lambda: _decode(model, x), device, 1) / T

    print(f"  input x {list(x.shape)} -> y {list(y.shape)}; return_sequence -> {list(seq.shape)}; "
          f"state {len(model.init_state(1))} x {list(model.init_state(batch)[0].shape)}")
    tol = TOLERANCE[device.type]
    checks = {
        "forward (last position)": _max_rel_err(y, ref_seq[:, -1]),
        "forward (all positions)": _max_rel_err(seq, ref_seq),
        "streaming step()": _max_rel_err(streamed, ref_seq),
    }
    ok = params_ok
    for name, err in checks.items():
        passed = err <= tol and err == err       # err == err rejects NaN
        ok = ok and passed
        print(f"  {name:<24} max rel err vs float64 reference {err:.2e} "
              f"(tol {tol:.0e}) {'PASS' if passed else 'FAIL'}")
    print(f"  timing: forward {forward_ms:.2f} ms (batch {batch} x {T} positions), "
          f"decode {decode_ms:.3f} ms per token (batch {batch})")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1
