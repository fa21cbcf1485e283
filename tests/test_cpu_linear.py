"""gla_ext.cpu_linear.PackedLinear (own SIMD matrix-vector kernels) against float64 products,
for every instruction set this CPU supports (GLA_EXT_CPU_ISA), odd sizes and n = 1..40."""
import pytest
import torch

import gla_ext

pytestmark = pytest.mark.skipif(not gla_ext.extension_loaded(),
                                reason="gla_ext._C is not built (PackedLinear needs it)")

ISAS = ["generic", "avx2", "avx512"]
# Relative error vs float64 of the same (rounded) weights: float32 accumulation only.
TOL = 1e-5


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def packed(weight, bias, isa, monkeypatch):
    """A PackedLinear built for `isa`; skips when this CPU cannot run it."""
    from gla_ext.cpu_linear import PackedLinear
    monkeypatch.setenv("GLA_EXT_CPU_ISA", isa)
    lin = PackedLinear(weight, bias)
    monkeypatch.delenv("GLA_EXT_CPU_ISA")
    if lin.isa != isa:
        pytest.skip(f"this CPU has no {isa} (got {lin.isa})")
    return lin


def reference(x, weight, bias):
    y = x.double() @ weight.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_f,in_f", [(1, 1), (7, 5), (33, 17), (64, 64), (100, 287),
                                        (257, 31), (1280, 256)])
def test_matches_float64(isa, dtype, out_f, in_f, monkeypatch):
    weight = torch.randn(out_f, in_f).to(dtype)
    bias = torch.randn(out_f) if out_f % 2 else None
    lin = packed(weight, bias, isa, monkeypatch)
    for n in (1, 2, 3, 5, 8, 9, 13, 32, 40):
        x = torch.randn(n, in_f)
        y = lin(x)
        assert y.shape == (n, out_f) and y.dtype == torch.float32
        assert rel_err(y, reference(x, weight, bias)) < TOL, (n, out_f, in_f)


@pytest.mark.parametrize("isa", ISAS)
def test_every_batch_size_and_out_buffer(isa, monkeypatch):
    weight, bias = torch.randn(45, 19), torch.randn(45)
    lin = packed(weight, bias, isa, monkeypatch)
    for n in range(1, 41):
        x = torch.randn(n, 19)
        out = torch.full((n, 45), float("nan"))
        assert lin(x, out=out) is out
        assert rel_err(out, reference(x, weight, bias)) < TOL, n
        assert torch.equal(lin(x), out)          # same kernels, same rounding


def test_rows_are_independent_of_the_batch():
    """A row's result does not depend on which other rows share the call (bitwise)."""
    from gla_ext.cpu_linear import PackedLinear
    weight = torch.randn(70, 50)
    lin = PackedLinear(weight)
    x = torch.randn(40, 50)
    full = lin(x)
    for n in (1, 3, 8, 17):
        assert torch.equal(lin(x[:n]), full[:n])


def test_leading_dims_non_contiguous_and_other_float_inputs():
    from gla_ext.cpu_linear import PackedLinear
    layer = torch.nn.Linear(10, 24)
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert rel_err(PackedLinear.from_linear(layer)(x), layer(x)) < TOL
    weight = torch.randn(24, 10)
    lin = PackedLinear(weight)
    x = torch.randn(2, 3, 10)
    assert rel_err(lin(x), reference(x, weight, None)) < TOL and lin(x).shape == (2, 3, 24)
    xt = torch.randn(10, 5).t()
    assert rel_err(lin(xt), reference(xt, weight, None)) < TOL
    xd = torch.randn(4, 10, dtype=torch.float64)
    assert rel_err(lin(xd), reference(xd, weight, None)) < TOL


def test_packing_copies_the_weight():
    from gla_ext.cpu_linear import PackedLinear
    weight = torch.randn(9, 6)
    lin = PackedLinear(weight)
    x = torch.randn(2, 6)
    before = lin(x)
    weight.add_(1)
    assert torch.equal(lin(x), before)


def test_large_call_splits_across_threads_with_the_same_result():
    from gla_ext.cpu_linear import PackedLinear
    weight = torch.randn(3000, 300)
    lin = PackedLinear(weight)
    x = torch.randn(32, 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lin(x)
        torch.set_num_threads(max(2, threads))
        many = lin(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)                  # panels are independent
    assert rel_err(many, reference(x, weight, None)) < TOL


def test_bad_arguments_raise_clearly():
    from gla_ext.cpu_linear import PackedLinear
    with pytest.raises(ValueError, match="2-D"):
        PackedLinear(torch.randn(3))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        PackedLinear(torch.randn(3, 4).double())
    with pytest.raises(ValueError, match="bias"):
        PackedLinear(torch.randn(3, 4), torch.randn(4))
    lin = PackedLinear(torch.randn(3, 4))
    with pytest.raises(ValueError, match="in=4"):
        lin(torch.randn(2, 5))
    with pytest.raises(ValueError, match="out"):
        lin(torch.randn(2, 4), out=torch.empty(2, 4))
    with pytest.raises(ValueError, match="out"):
        lin(torch.randn(2, 4), out=torch.empty(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError):
        lin([1.0, 2.0, 3.0, 4.0])
