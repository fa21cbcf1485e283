"""The oracle itself: chunked reference == naive recurrence, forward and every gradient, float64."""
import pytest
import torch

from gla_ext.reference import chunk_gla_reference, naive_recurrent_gla
from helpers import make_inputs, reference_grads, rel_err


@pytest.mark.parametrize("normalizer", [0.1, 1.0, 16.0])
@pytest.mark.parametrize("T,K,V,chunk", [(37, 60, 100, 16), (50, 100, 60, 32), (1, 8, 8, 16)])
def test_chunked_matches_naive(normalizer, T, K, V, chunk):
    B, H = 2, 2
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, torch.float64, normalizer=normalizer)
    grad_o = torch.randn(B, T, H, V, dtype=torch.float64)
    grad_ht = torch.randn(B, H, K, V, dtype=torch.float64)
    o1, ht1, g1 = reference_grads(naive_recurrent_gla, (q, k, v, g, h0), grad_o, grad_ht)
    o2, ht2, g2 = reference_grads(chunk_gla_reference, (q, k, v, g, h0), grad_o, grad_ht,
                                  chunk_size=chunk)
    assert rel_err(o2, o1) < 1e-12
    assert rel_err(ht2, ht1) < 1e-12
    for name, a, b in zip("q k v g h0".split(), g2, g1):
        assert rel_err(a, b) < 1e-11, name


def test_chunked_matches_naive_varlen_with_empty_sequence():
    cu = torch.tensor([0, 7, 7, 30, 41])
    T, H, K, V = 41, 2, 12, 10
    q, k, v, g, h0 = make_inputs(1, T, H, K, V, torch.float64, n_states=4)
    grad_o = torch.randn(1, T, H, V, dtype=torch.float64)
    grad_ht = torch.randn(4, H, K, V, dtype=torch.float64)
    o1, ht1, g1 = reference_grads(naive_recurrent_gla, (q, k, v, g, h0), grad_o, grad_ht,
                                  cu_seqlens=cu)
    o2, ht2, g2 = reference_grads(chunk_gla_reference, (q, k, v, g, h0), grad_o, grad_ht,
                                  cu_seqlens=cu, chunk_size=16)
    assert rel_err(o2, o1) < 1e-12 and rel_err(ht2, ht1) < 1e-12
    for a, b in zip(g2, g1):
        assert rel_err(a, b) < 1e-11
    # the empty sequence passes its initial state through untouched
    assert torch.equal(ht1[1], h0[1])


def test_varlen_equals_separate_sequences():
    cu = [0, 5, 18]
    T, H, K, V = 18, 2, 6, 5
    q, k, v, g, h0 = make_inputs(1, T, H, K, V, torch.float64, n_states=2)
    o, ht = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                                cu_seqlens=torch.tensor(cu))
    for n in range(2):
        s, e = cu[n], cu[n + 1]
        o_n, ht_n = naive_recurrent_gla(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e],
                                        initial_state=h0[n:n + 1], output_final_state=True)
        assert torch.allclose(o[:, s:e], o_n) and torch.allclose(ht[n], ht_n[0])


def test_full_forget_and_no_decay_are_exact():
    """g = -inf wipes the state, g = 0 keeps it: no NaN in either form."""
    B, T, H, K, V = 1, 20, 1, 4, 3
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, torch.float64)
    g[:, 9] = float("-inf")
    g[:, 12:] = 0.0
    for fn in (naive_recurrent_gla, chunk_gla_reference):
        o, ht = fn(q, k, v, g, initial_state=h0, output_final_state=True)
        assert torch.isfinite(o).all() and torch.isfinite(ht).all()
        # after the full forget at t=9, the state only holds tokens 9.. with no decay after 12
        o_tail, ht_tail = fn(q[:, 9:], k[:, 9:], v[:, 9:], g[:, 9:], output_final_state=True)
        assert torch.allclose(o[:, 9:], o_tail) and torch.allclose(ht, ht_tail)


def test_reverse_is_forward_on_flipped_time():
    q, k, v, g, h0 = make_inputs(2, 15, 2, 5, 7, torch.float64)
    o, ht = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                                reverse=True)
    flip = lambda x: x.flip(1)  # noqa: E731
    o2, ht2 = naive_recurrent_gla(flip(q), flip(k), flip(v), flip(g), initial_state=h0,
                                  output_final_state=True)
    assert torch.allclose(o, flip(o2)) and torch.allclose(ht, ht2)
