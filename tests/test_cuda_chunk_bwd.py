"""Gradients of chunk_gla(backend="cuda") in bfloat16 and float16 (csrc/cuda/chunk_bwd.cu), and
in float32 on the tf32 tensor cores under both matmul precisions (csrc/cuda/chunk_bwd_f32.cuh:
"highest" <= 1e-5, "high" <= 1e-3; these have only run in the CPU emulator so far).

The backward is reached the way users reach it: through the autograd of chunk_gla, with
torch.autograd.grad and random gradients arriving on the output (do) and on the final state
(dht), i.e. the gradient of loss = (o * do).sum() + (final_state * dht).sum(). Checked:

- dq, dk, dv, dg, d(initial_state), and the forward's o and final state, against
  gla_ext.reference.naive_recurrent_gla in float64 differentiated by autograd, on the same
  rounded inputs (q, k, v, do in bf16/fp16; g, h0, dht in float32) cast to float64. The long
  case uses gla_ext.reference.chunk_gla_reference in float64 instead (same math, much faster
  for long T; tests/test_reference.py checks it against the naive one, gradients included).
- Error is ||x - ref|| / ||ref|| with docs/design.md's bounds (bf16 1e-2, fp16 5e-3); every result
  must be finite. For dg the denominator is floored, as in tests/test_cuda_recurrent.py, at
  1e-2 * (||q * dq_ref|| + ||k * dk_ref||): with full-forget gates (-1e4, -inf) the exact dg is
  0 while the kernel's dg is a sum of terms that cancel, so only an absolute error, measured
  against the size of those terms, makes sense there. For drawn gates the floor never binds.
- Gradients are allocated with torch.empty, so before the backward the allocator's free blocks
  of the gradients' sizes are filled with 0xFF bytes (NaN in float32, float16 and bfloat16):
  anything the kernel leaves unwritten shows up as NaN.
- Two runs on the same inputs give bitwise-identical results (no atomics-order dependence).

Inputs are fresh random draws every run; gates are logsigmoid(randn) / normalizer for
normalizer in {0.1, 1, 16}, or constants (-1e4, 0, -inf), or a mix of those. K > 128 is split
into slices by the Python wrapper, so (256, 64) also checks the sliced backward.

Skips cleanly without a GPU, without the compiled extension, or when gla_ext::chunk_bwd has no
CUDA kernel.
"""

import pytest
import torch

from gla_ext import chunk_gla, ops
from gla_ext.reference import chunk_gla_reference, naive_recurrent_gla
from helpers import (CUDA_BF16_DG_STRONG_DECAY_TOL, TOLERANCE, cuda_gates, has_cuda_kernel, nbytes,
                     poison_cuda_allocator)


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not has_cuda_kernel("gla_ext::chunk_bwd"),
                       reason="gla_ext._C has no CUDA kernel for gla_ext::chunk_bwd"),
]

DTYPES = [torch.bfloat16, torch.float16]
# widest K slice the wrapper hands to the CUDA chunk kernels (wider K is split)
MAX_K = getattr(ops, "_CUDA_CHUNK_MAX_K", 128)


# ---- inputs -----------------------------------------------------------------------------

def make_case(B, T, H, K, V, dtype, gate=1.0, h0=True, do=True, dht=True, offsets=None):
    """Random inputs and output gradients. do/dht False: no gradient arrives on that output
    (dht False also means output_final_state=False)."""
    cu, N = None, B
    if offsets is not None:
        assert B == 1 and offsets[-1] == T
        cu = torch.tensor(offsets, dtype=torch.int64, device="cuda")
        N = len(offsets) - 1
    return dict(
        q=torch.randn(B, T, H, K, device="cuda").to(dtype),
        k=torch.randn(B, T, H, K, device="cuda").to(dtype),
        v=torch.randn(B, T, H, V, device="cuda").to(dtype),
        g=cuda_gates((B, T, H, K), gate),
        h0=torch.randn(N, H, K, V, device="cuda") if h0 else None,
        do=torch.randn(B, T, H, V, device="cuda").to(dtype) if do else None,
        dht=torch.randn(N, H, K, V, device="cuda") if dht else None,
        cu=cu, N=N, dtype=dtype,
        desc=f"B={B} T={T} H={H} K={K} V={V} {dtype} gate={gate} h0={h0} do={do} dht={dht} "
             f"offsets={offsets}",
    )


# ---- the CUDA path ----------------------------------------------------------------------

def _grad_nbytes(c):
    """Sizes of what the backward op allocates: per K slice dq, dk, dg, dh0, and dv."""
    B, T, H, K = c["q"].shape
    V = c["v"].shape[-1]
    sizes = [nbytes((B, T, H, V), c["v"].dtype)]
    for lo in range(0, K, MAX_K):
        ks = min(MAX_K, K - lo)
        sizes += [nbytes((B, T, H, ks), c["q"].dtype), nbytes((B, T, H, ks), torch.float32),
                  nbytes((c["N"], H, ks, V), torch.float32)]
    return sizes


def run_cuda(c):
    """chunk_gla(backend="cuda") and its gradients through autograd, on poisoned memory.

    Returns ({"o", "ht"} of the outputs that exist, {"q", "k", "v", "g", "h0"} gradients)."""
    names = ["q", "k", "v", "g"] + (["h0"] if c["h0"] is not None else [])
    leaves = {n: c[n].detach().clone().requires_grad_() for n in names}
    o, ht = chunk_gla(leaves["q"], leaves["k"], leaves["v"], leaves["g"],
                      initial_state=leaves.get("h0"), output_final_state=c["dht"] is not None,
                      cu_seqlens=c["cu"], backend="cuda")
    outs, grad_outs = [], []
    if c["do"] is not None:
        outs.append(o)
        grad_outs.append(c["do"])
    if c["dht"] is not None:
        outs.append(ht)
        grad_outs.append(c["dht"])
    poison_cuda_allocator(*_grad_nbytes(c))
    grads = torch.autograd.grad(outs, [leaves[n] for n in names], grad_outs)
    torch.cuda.synchronize()
    results = {"o": o.detach()}
    if ht is not None:
        results["ht"] = ht.detach()
    return results, dict(zip(names, grads))


# ---- the float64 reference --------------------------------------------------------------

def run_reference(c, fn=naive_recurrent_gla, **kwargs):
    """Same as run_cuda in float64 (missing output gradients are zeros); no poisoning."""
    names = ["q", "k", "v", "g"] + (["h0"] if c["h0"] is not None else [])
    leaves = {n: c[n].detach().double().requires_grad_() for n in names}
    o, ht = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"],
               initial_state=leaves.get("h0"), output_final_state=True, cu_seqlens=c["cu"],
               **kwargs)
    do = torch.zeros_like(o) if c["do"] is None else c["do"].double()
    dht = torch.zeros_like(ht) if c["dht"] is None else c["dht"].double()
    grads = torch.autograd.grad([o, ht], [leaves[n] for n in names], [do, dht],
                                allow_unused=True)
    grads = [torch.zeros_like(leaves[n]) if gr is None else gr for n, gr in zip(names, grads)]
    return {"o": o.detach(), "ht": ht.detach()}, dict(zip(names, grads))


# ---- comparison -------------------------------------------------------------------------

def rel_err(x, ref, floor=0.0):
    diff = (x.double() - ref).norm().item()
    denom = max(ref.norm().item(), floor)
    return diff / denom if denom > 0 else diff


def check(c, reference=run_reference, dg_tol=None, tol=None):
    outs, grads = run_cuda(c)
    outs_r, grads_r = reference(c)
    dtype, desc = c["dtype"], c["desc"]

    expected_dtype = dict(o=dtype, ht=torch.float32, dq=dtype, dk=dtype, dv=dtype,
                          dg=torch.float32, dh0=torch.float32)
    found = {**outs, **{f"d{n}": x for n, x in grads.items()}}
    refs = {**{n: outs_r[n] for n in outs}, **{f"d{n}": grads_r[n] for n in grads}}
    for name, x in found.items():
        ref = refs[name]
        assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
        assert x.dtype == expected_dtype[name], f"{name}: dtype {x.dtype} ({desc})"
        bad = (~torch.isfinite(x)).sum().item()
        assert bad == 0, f"{name}: {bad} NaN/inf entries (unwritten or overflowed) ({desc})"

    # dg: absolute error against the size of the cancelling terms where the exact dg is ~0
    dg_terms = ((c["q"].double() * grads_r["q"]).norm()
                + (c["k"].double() * grads_r["k"]).norm()).item()
    floors = {"dg": 1e-2 * dg_terms}
    errors = {name: rel_err(x, refs[name], floors.get(name, 0.0)) for name, x in found.items()}
    tol = TOLERANCE[("cuda", dtype)] if tol is None else tol
    bounds = {n: (dg_tol if n == "dg" and dg_tol is not None else tol) for n in errors}
    too_big = {n: f"{e:.2e}" for n, e in errors.items() if not e <= bounds[n]}
    assert not too_big, (f"relative errors above {tol}: {too_big} ({desc}); "
                         f"all: { {n: f'{e:.2e}' for n, e in errors.items()} }")
    return errors


# ---- tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (60, 100), (100, 60), (256, 64),
                                 (32, 200)])
@pytest.mark.parametrize("normalizer", [0.1, 1.0, 16.0])
def test_gradients_match_reference(dtype, K, V, normalizer):
    strong_decay_bf16 = dtype == torch.bfloat16 and normalizer == 0.1
    check(make_case(2, 130, 2, K, V, dtype, gate=normalizer),
          dg_tol=CUDA_BF16_DG_STRONG_DECAY_TOL if strong_decay_bf16 else None)  # see helpers.py


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200, 333])
@pytest.mark.parametrize("K,V", [(64, 64), (256, 64)])
def test_sequence_lengths(dtype, T, K, V):
    check(make_case(2, T, 2, K, V, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grads_on", ["o+ht", "o", "ht"])
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "no-h0"])
def test_optional_states(dtype, grads_on, h0):
    """No initial state; no final state (output_final_state=False); only the final state used.

    Slow decay (normalizer 16): with only dht, dh0 = dht * prod(exp(g)) over all of T, which
    faster decay would push below float32's range."""
    check(make_case(2, 150, 2, 64, 100, dtype, gate=16.0, h0=h0, do="o" in grads_on,
                    dht="ht" in grads_on))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("K,V", [(64, 64), (100, 60), (256, 64)])
def test_varlen_with_empty_sequences(dtype, h0, K, V):
    # empty sequences first, in the middle and last-but-one, and a one-token sequence last;
    # an empty sequence's dh0 is its dht (or nothing flows)
    offsets = [0, 0, 70, 70, 200, 201]
    check(make_case(1, 201, 2, K, V, dtype, h0=h0, offsets=offsets))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_packed_sequences(dtype):
    """300 packed sequences of 0..100 tokens: more than one round of the chunk-offset scan,
    and the binary search that maps blocks to chunks across empty sequences."""
    lengths = torch.randint(0, 17, (300,))
    lengths[::7] = 100   # some sequences span two chunks
    lengths[torch.rand(300) < 0.2] = 0
    offsets = [0] + torch.cumsum(lengths, 0).tolist()
    check(make_case(1, offsets[-1], 2, 64, 64, dtype, offsets=offsets))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", ["-1e4", "0", "-inf", "mixed"])
@pytest.mark.parametrize("K,V", [(64, 64), (256, 64)])
def test_extreme_gates(dtype, gate, K, V):
    """Full forget (-1e4, -inf: exact dg and dh0 are 0) and no decay (0) give finite gradients."""
    check(make_case(2, 150, 2, K, V, dtype, gate=gate))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", [16.0, "0"])
def test_long_sequence(dtype, gate):
    """Many chunks: float32 state and gradient carries must not drift over T=2048."""
    c = make_case(1, 2048, 2, 128, 128, dtype, gate=gate)
    check(c, reference=lambda c: run_reference(c, fn=chunk_gla_reference, chunk_size=64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["dense", "varlen-split-k"])
def test_deterministic(dtype, layout):
    if layout == "dense":
        c = make_case(2, 333, 2, 128, 100, dtype)
    else:
        c = make_case(1, 201, 2, 256, 64, dtype, offsets=[0, 0, 70, 70, 200, 201])
    outs1, grads1 = run_cuda(c)
    outs2, grads2 = run_cuda(c)
    first = {**outs1, **{f"d{n}": x for n, x in grads1.items()}}
    second = {**outs2, **{f"d{n}": x for n, x in grads2.items()}}
    for name, x in first.items():
        assert torch.isfinite(x).all(), f"{name}: NaN/inf"
        assert torch.equal(x, second[name]), f"{name} differs between two identical runs"


def test_k_slice_matches_device():
    """K slice 128 where the K=128 backward's shared memory fits (sm_80, sm_90), else 64; the
    Python rule (device properties) and the extension's own query agree."""
    from gla_ext import _ext
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    expected = int(_ext._C.cuda_chunk_max_k(torch.cuda.current_device()))
    assert expected in (64, 128)
    assert ops._cuda_max_k("chunk", torch.bfloat16, torch.device("cuda")) == expected
    if torch.cuda.get_device_capability() in ((8, 0), (9, 0)):
        assert expected == 128, f"{props.name} should take K=128 in one pass"


# ---- float32 (tf32 tensor cores) ---------------------------------------------------------

F32_BOUND = {"highest": 1e-5, "high": 1e-3}  # docs/design.md "Numerics"


def check_f32(c, precision, **kwargs):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)  # read by the kernels at every call
    try:
        errors = check(c, tol=F32_BOUND[precision], **kwargs)
    finally:
        torch.set_float32_matmul_precision(old)
    if precision == "high":  # one tf32 pass is measurably less accurate than 3xTF32
        assert max(errors[n] for n in ("dq", "dk", "dv")) > 1e-6, errors
    return errors


@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (60, 100)])
@pytest.mark.parametrize("normalizer", [1.0, 16.0])
def test_float32_gradients(precision, K, V, normalizer):
    check_f32(make_case(2, 200, 2, K, V, torch.float32, gate=normalizer), precision)


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_float32_varlen_and_long(precision):
    check_f32(make_case(1, 201, 2, 96, 40, torch.float32, offsets=[0, 0, 70, 70, 200, 201]),
              precision)
    c = make_case(1, 2048, 2, 128, 128, torch.float32, gate=16.0)
    check_f32(c, precision,
              reference=lambda c: run_reference(c, fn=chunk_gla_reference, chunk_size=64))
