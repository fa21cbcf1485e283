"""CUDA-graph decode equals eager step(); refuses clearly without a GPU."""
import pytest
import torch

from gla_ext import GLA

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_refuses_without_cuda_model():
    model = GLA.build(embed_dim=16, hidden_size=16, num_layers=1, num_heads=2, head_dim=8).eval()
    with pytest.raises(RuntimeError, match="CUDA"):
        model.cuda_graph_step(2)


@needs_gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_step_matches_eager(batch):
    model = GLA.build(embed_dim=40, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                      dropout=0.0).cuda().eval()
    x = torch.randn(batch, 12, 40, device="cuda")
    decoder = model.cuda_graph_step(batch)
    decoder.reset()
    state = model.init_state(batch, device="cuda")
    with torch.no_grad():
        for t in range(x.shape[1]):
            y_graph = decoder(x[:, t]).clone()
            y_eager, state = model.step(x[:, t], state)
            assert torch.allclose(y_graph, y_eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(decoder.state, state):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="captured shape"):
        decoder(torch.randn(batch + 1, 40, device="cuda"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_graph_step_on_a_device_that_is_not_current():
    """A model on cuda:1 while cuda:0 is current: capture and replay on cuda:1."""
    model = GLA.build(embed_dim=24, hidden_size=16, num_layers=1, num_heads=2, head_dim=8,
                      dropout=0.0).to("cuda:1").eval()
    x = torch.randn(2, 5, 24, device="cuda:1")
    with torch.cuda.device(0):
        decoder = model.cuda_graph_step(2)
        decoder.reset()
        state = model.init_state(2, device="cuda:1")
        with torch.no_grad():
            for t in range(x.shape[1]):
                y_graph = decoder(x[:, t]).clone()
                y_eager, state = model.step(x[:, t], state)
                assert y_graph.device == torch.device("cuda:1")
                assert torch.allclose(y_graph, y_eager, rtol=1e-4, atol=1e-5)
    assert decoder.stream.device == torch.device("cuda:1")
