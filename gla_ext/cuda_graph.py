"""CUDA-graph decode: one model.step captured once, replayed per token.

    decoder = model.cuda_graph_step(batch_size)     # captures on the model's CUDA device
    decoder.reset()                                 # zero state (or reset(state) to load one)
    for x_t in tokens:                              # x_t [batch, embed_dim]
        y_t = decoder(x_t)                          # [batch, hidden_size]; valid until the next call

The input, output and recurrent state live in static buffers owned by the decoder, so a
step is one graph launch: no host synchronisation, no allocation. The state buffers are
the decoder's `state` attribute (a list per layer, the layout of model.init_state).
"""
from __future__ import annotations

import torch

__all__ = ["CUDAGraphStep"]


class CUDAGraphStep:
    """A captured model.step for a fixed batch size (see the module docstring)."""

    def __init__(self, model, batch_size: int, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("cuda_graph_step needs a CUDA device; none is available")
        param = next(model.parameters())
        if param.device.type != "cuda":
            raise RuntimeError(f"cuda_graph_step: move the model to CUDA first "
                               f"(its parameters are on {param.device})")
        if model.training:
            raise RuntimeError("cuda_graph_step: call model.eval() first (dropout would be "
                               "frozen into the graph)")
        self.model = model
        self.device = param.device
        # Everything below runs with the model's device current and captures on a stream of
        # its own on that device: torch.cuda.graph's default capture stream is made on the
        # *current* device, so a model on cuda:1 with cuda:0 current captured an empty graph.
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(device=self.device)
            self.x = torch.zeros(batch_size, model.embed_dim, device=self.device,
                                 dtype=param.dtype)
            self.state = model.init_state(batch_size, device=self.device)
            # Warm up on the capture stream (lazy initialisation must not happen in capture).
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream), torch.no_grad():
                for _ in range(warmup):
                    model.step(self.x, self.state)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph, stream=self.stream):
                self.y, new_state = model.step(self.x, self.state)
                for buf, new in zip(self.state, new_state):
                    buf.copy_(new)

    def reset(self, state=None):
        """Zero the recurrent state, or load `state` (a list like model.init_state's) into it."""
        for i, buf in enumerate(self.state):
            if state is None:
                buf.zero_()
            else:
                buf.copy_(state[i])

    def __call__(self, x_t: torch.Tensor) -> torch.Tensor:
        """One decode step; returns the static output buffer [batch, hidden_size]."""
        if x_t.dim() == 3:
            x_t = x_t.squeeze(1)
        if tuple(x_t.shape) != tuple(self.x.shape):
            raise ValueError(f"cuda_graph_step: x_t must be {list(self.x.shape)} "
                             f"[batch, embed_dim] (the captured shape), got {tuple(x_t.shape)}")
        # replayed on the model's device, in order with its current stream (where the input
        # copy below runs and where the caller reads the output)
        with torch.cuda.device(self.device):
            self.x.copy_(x_t)
            self.graph.replay()
        return self.y
