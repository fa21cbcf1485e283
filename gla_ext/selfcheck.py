"""`python -m gla_ext check`: every built backend against the float64 reference on this machine."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext
from .ops import chunk_gla, fused_recurrent_gla
from .reference import naive_recurrent_gla

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
CUDA_FP32_TOLERANCE = 1e-3   # docs/design.md "Numerics": float32 on GPU


def _rel(x, ref):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(x).any():
        return float("nan")
    d = ref.norm().item()
    return (x - ref).norm().item() / (d if d > 0 else 1.0)


def _case(op, backend, device, dtype, T=75, cu=None, reverse=False, normalizer=1.0):
    B = 1 if cu is not None else 2
    H, K, V = 2, 60, 100
    N = B if cu is None else len(cu) - 1
    q = torch.randn(B, T, H, K).to(dtype)
    k = torch.randn(B, T, H, K).to(dtype)
    v = torch.randn(B, T, H, V).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, H, K)) / normalizer
    h0 = torch.randn(N, H, K, V)
    do = torch.randn(B, T, H, V).to(dtype)
    dht = torch.randn(N, H, K, V)
    cu_t = None if cu is None else torch.tensor(cu)
    ref_in = [x.double().requires_grad_() for x in (q, k, v, g, h0)]
    o_ref, ht_ref = naive_recurrent_gla(*ref_in[:4], initial_state=ref_in[4],
                                        output_final_state=True, reverse=reverse, cu_seqlens=cu_t)
    ((o_ref * do.double()).sum() + (ht_ref * dht.double()).sum()).backward()
    ins = [x.to(device).requires_grad_() for x in (q, k, v, g, h0)]
    kw = dict(initial_state=ins[4], output_final_state=True, backend=backend,
              cu_seqlens=None if cu_t is None else cu_t.to(device))
    if op is fused_recurrent_gla:
        kw["reverse"] = reverse
    o, ht = op(*ins[:4], **kw)
    ((o * do.to(device)).sum() + (ht * dht.to(device)).sum()).backward()
    errs = {"o": _rel(o, o_ref), "ht": _rel(ht, ht_ref)}
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dh0"], ins, ref_in):
        errs[name] = _rel(a.grad, b.grad)
    return errs


def available_backends():
    backends = [("reference", "cpu")]
    if _ext.has_cpu():
        backends.append(("cpu", "cpu"))
    if _ext.has_cuda() and torch.cuda.is_available():
        backends.append(("cuda", "cuda"))
    return backends


def run_check(verbose: bool = True) -> int:
    """Prints one row per (backend, op, dtype, case); returns 0 when every row passes."""
    torch.manual_seed(torch.seed() % (2 ** 31))   # fresh inputs every run
    failures = 0
    header = f"{'backend':10} {'op':20} {'dtype':9} {'case':16} {'max rel err':>12} {'tol':>8}  result"
    print(header)
    print("-" * len(header))
    for backend, device in available_backends():
        dtypes = [torch.float32] if backend == "reference" else list(TOLERANCE)
        for op in (chunk_gla, fused_recurrent_gla):
            for dtype in dtypes:
                cases = {"batch": {}, "varlen+empty": {"cu": [0, 30, 30, 75]},
                         "strong decay": {"normalizer": 0.1}}
                if op is fused_recurrent_gla:
                    cases["reverse"] = {"reverse": True}
                for case, kwargs in cases.items():
                    errs = _case(op, backend, device, dtype, **kwargs)
                    worst = max(errs.values())
                    tol = TOLERANCE[dtype]
                    if backend == "cuda" and dtype == torch.float32:
                        tol = CUDA_FP32_TOLERANCE
                    ok = worst <= tol
                    failures += not ok
                    print(f"{backend:10} {op.__name__:20} {str(dtype)[6:]:9} {case:16} "
                          f"{worst:12.2e} {tol:8.0e}  {'PASS' if ok else 'FAIL ' + str(errs)}")
    if not _ext.loaded():
        print(f"\nnote: compiled extension not loaded ({_ext.LOAD_ERROR}); only the reference ran")
    print(f"\n{'all checks passed' if failures == 0 else f'{failures} check(s) FAILED'}")
    return 1 if failures else 0
