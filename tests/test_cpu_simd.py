"""The CPU instruction-set layer (csrc/cpu/simd/): the feature detector against /proc/cpuinfo,
the GLA_EXT_CPU_ISA choice, and every SIMD vocabulary function against float64, for every
instruction set this CPU runs (fresh random inputs, odd lengths so the padded tails run)."""
import os

import pytest
import torch

import gla_ext

pytestmark = pytest.mark.skipif(not gla_ext.extension_loaded(),
                                reason="gla_ext._C is not built (the ISA layer is C++)")

ISAS = ["generic", "avx2", "avx512"]
RANK = {name: i for i, name in enumerate(ISAS)}
TINY = 1.2e-38  # below float's normal range: flushed to zero under FTZ/DAZ


def _C():
    from gla_ext import _ext
    return _ext._C


@pytest.fixture(autouse=True)
def _fresh_seed():
    print(f"torch seed {torch.seed()}")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Forces one compiled copy; skips the copies this CPU cannot run."""
    if RANK[_C().cpu_best_isa()] < RANK[request.param]:
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("GLA_EXT_CPU_ISA", request.param)
    assert _C().cpu_isa() == request.param
    return request.param


def cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_features_match_cpuinfo():
    flags = cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    feats = _C().cpu_features()
    for name in ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                 "avx512_bf16", "avx512_vnni", "avx_vnni"]:
        assert feats[name] == (name in flags), name
    for name in ["amx_tile", "amx_bf16", "amx_int8"]:  # also needs the OS permission
        assert not feats[name] or name in flags, name
        assert not feats[name] or feats["amx_permitted"], name


def test_best_isa_follows_features():
    f = _C().cpu_features()
    avx2 = f["avx2"] and f["fma"] and f["f16c"]
    avx512 = avx2 and all(f[n] for n in ["avx512f", "avx512bw", "avx512vl", "avx512dq"])
    assert _C().cpu_best_isa() == ("avx512" if avx512 else "avx2" if avx2 else "generic")
    assert _C().cpu_best_isa() in _C().cpu_isa_summary()


def test_env_choice(monkeypatch):
    best = _C().cpu_best_isa()
    # the emulated test build (tools/avx512_emulated_check.sh) runs avx512 on any AVX2 CPU
    avx512 = "avx512" if _C().cpu_avx512_emulated() and RANK[best] >= 1 else best
    for value, want in [("", best), ("auto", best), ("generic", "generic"),
                        ("avx2", "avx2" if RANK[best] >= 1 else "generic"), ("avx512", avx512)]:
        monkeypatch.setenv("GLA_EXT_CPU_ISA", value)
        assert _C().cpu_isa() == want, value
    monkeypatch.delenv("GLA_EXT_CPU_ISA")
    assert _C().cpu_isa() == best


def test_env_unknown_value_is_an_error(monkeypatch):
    monkeypatch.setenv("GLA_EXT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="GLA_EXT_CPU_ISA"):
        _C().cpu_isa()
    q = torch.randn(1, 8, 1, 16)
    g = torch.nn.functional.logsigmoid(torch.randn(1, 8, 1, 16))
    for op in (gla_ext.chunk_gla, gla_ext.fused_recurrent_gla):   # both read the choice
        with pytest.raises((ValueError, RuntimeError), match="GLA_EXT_CPU_ISA"):
            op(q, q, q, g, backend="cpu")


def test_vnni_env_choice(monkeypatch):
    """GLA_EXT_CPU_VNNI (read with GLA_EXT_CPU_ISA in cpu_features.cpp): auto / unset uses
    vpdpbusd for the quantized kernels where the copy's VNNI extension is present (avx512:
    AVX512-VNNI, avx2: AVX-VNNI; in the emulated build both, through SIMDe), off never; any
    other value is a ValueError naming the variable. info's line says which runs."""
    f, emulated = _C().cpu_features(), _C().cpu_avx512_emulated()
    present = {"generic": False, "avx2": f["avx_vnni"] or emulated,
               "avx512": f["avx512_vnni"] or emulated}
    import gla_ext.__main__
    for asked in ISAS:
        monkeypatch.setenv("GLA_EXT_CPU_ISA", asked)
        isa = _C().cpu_isa()   # asking for an ISA the CPU lacks gives the best one
        for value, want in [("", present[isa]), ("auto", present[isa]), ("off", False)]:
            monkeypatch.setenv("GLA_EXT_CPU_VNNI", value)
            assert _C().linear_vnni() == want, (isa, value)
            kernels = _C().linear_qdot_kernels()
            assert kernels.startswith(isa) and (("VNNI" in kernels) == want), kernels
            assert f"packed {kernels} integer kernels" in gla_ext.__main__.quantized_kernels()
        monkeypatch.setenv("GLA_EXT_CPU_VNNI", "on")
        with pytest.raises(ValueError, match="GLA_EXT_CPU_VNNI"):
            _C().linear_vnni()


def ev(fn, x, **kw):
    return _C().simd_eval(fn, x.contiguous(), **kw)


def close(y, ref, rel, atol=TINY, float64=False):
    """Elementwise |y - ref| <= rel |ref| + atol, with inf/nan where ref has them."""
    y, ref = y.double(), ref.double()
    if not float64:  # beyond float's range the float result is inf
        ref = torch.where(ref.abs() > torch.finfo(torch.float32).max, ref * float("inf"), ref)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(y[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])
    err = (y[finite] - ref[finite]).abs()
    bound = rel * ref[finite].abs() + atol
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.2f}x the bound (rel {rel})"


SPECIAL = [0.0, -0.0, float("-inf"), float("inf"), float("nan"), 1e-30, -1e-30, 88.7, 88.8,
           -87.3, -87.4, -103.0, -110.0, 30.0, -30.0]


def randrows(lo, hi, n=37, rows=9):
    return torch.rand(rows, n, dtype=torch.float64).mul(hi - lo).add(lo).float()


def test_exp(isa):
    x = torch.cat([randrows(-100, 89).flatten(), torch.tensor(SPECIAL)]).reshape(1, -1)
    y = ev("exp", x)
    close(y, torch.exp(x.double()), rel=3e-7)
    s = y[0, -len(SPECIAL):]
    assert s[0] == 1.0 and s[1] == 1.0                            # exact at 0
    assert s[2] == 0.0 and s[3] == float("inf")                   # -inf, +inf


def test_exp_double(isa):
    x = torch.cat([torch.rand(301, dtype=torch.float64) * 1400 - 700,
                   torch.tensor(SPECIAL, dtype=torch.float64)]).reshape(1, -1)
    y = ev("exp", x)
    close(y, torch.exp(x), rel=4e-15, atol=1e-300, float64=True)
    assert y[0, -len(SPECIAL)] == 1.0


def test_log1p_relative_accuracy(isa):
    # t in [0, 1], including tiny t where forming 1 + t would lose every digit
    t = torch.cat([torch.rand(300, dtype=torch.float64),
                   10 ** -torch.rand(60, dtype=torch.float64).mul(30),
                   torch.tensor([0.0, 1.0, 1e-38], dtype=torch.float64)]).float().reshape(1, -1)
    close(ev("log1p", t), torch.log1p(t.double()), rel=3e-7)


def test_logsigmoid(isa):
    x = torch.cat([randrows(-60, 60).flatten(), torch.tensor(SPECIAL)]).reshape(1, -1)
    close(ev("logsigmoid", x), torch.nn.functional.logsigmoid(x.double()), rel=6e-7)


@pytest.mark.parametrize("fn", ["sigmoid", "silu"])
def test_sigmoid_silu(isa, fn):
    x = torch.cat([randrows(-60, 60).flatten(), torch.tensor(SPECIAL[:-2])]).reshape(1, -1)
    ref = getattr(torch.nn.functional, fn)(x.double())
    close(ev(fn, x), ref, rel=6e-7, atol=1e-30)


@pytest.mark.parametrize("n", [1, 7, 16, 37, 128, 301])
def test_norm_rows(isa, n):
    x = torch.randn(5, n) * 3 + 0.5
    w, b = torch.randn(n), torch.randn(n)
    xd = x.double()
    rms = xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    close(ev("rmsnorm", x, w=w, eps=1e-6), rms * w.double(), rel=2e-6, atol=1e-6)
    close(ev("rmsnorm", x, eps=1e-6), rms, rel=2e-6, atol=1e-6)
    ln = torch.nn.functional.layer_norm(xd, (n,), w.double(), b.double(), eps=1e-5)
    close(ev("layernorm", x, w=w, b=b), ln, rel=2e-6, atol=1e-5)
    ln0 = torch.nn.functional.layer_norm(xd, (n,), eps=1e-5)
    close(ev("layernorm", x), ln0, rel=2e-6, atol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 16, 33, 1000])
def test_row_sum(isa, n):
    x = torch.randn(4, n)
    y = ev("row_sum", x)
    assert y.shape == (4,)
    err = (y.double() - x.double().sum(-1)).abs()
    assert (err <= 1e-6 * x.double().abs().sum(-1) + 1e-30).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="fn"):
        ev("tanh", torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="w must be"):
        ev("rmsnorm", torch.randn(2, 3), w=torch.randn(4))
