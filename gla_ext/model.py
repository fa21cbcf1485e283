"""The GLA sequence model: input projection, GLA blocks, final LayerNorm, last position.

    model = GLA.build(embed_dim=287)             # or gla_ext.build(...)
    y = model(x)                                 # [B, T, embed_dim] -> [B, hidden_size]
    y = model(x, lengths=lengths)                # right-padded batch: last valid position per row
    seq = model(x, return_sequence=True)         # [B, T, hidden_size]
    state = model.init_state(B)                  # streaming: one [B, H, D, D] float32 per layer
    y_t, state = model.step(x_t, state)          # x_t [B, embed_dim] -> [B, hidden_size]
    y, state = model(x, state=state, return_state=True)   # prefill, then step()
    pool = model.state_pool(capacity)            # many streams: see gla_ext.serving.StatePool

seq_len (default: window_size) is a shape hint, like window_size: inputs of any length
are accepted whatever its value. It records the length the model is expected to see
(for fixed-shape compilation / CUDA-graph capture); None says lengths vary.
"""
from __future__ import annotations

import torch
from torch import nn

from . import decode as _decode
from . import engine_choice as _choice
from . import prefill as _prefill
from . import sizing
from ._checks import _is_tracing
from .layers import GLABlock, build_gla_block, build_gla_layer
from .options import make_config

__all__ = ["GLA", "build"]


def _zero_padding(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """t [B, T, F] with the positions where mask [B, T] is False set to 0 (where, not *: NaN-safe)."""
    return torch.where(mask[:, :, None], t, torch.zeros((), dtype=t.dtype, device=t.device))


class GLA(nn.Module):
    """Stack of pre-norm GLA blocks mapping [batch, T, embed_dim] to [batch, hidden_size].

    Construct with GLA.build(**options) (or GLA(**options)); the options are listed in
    gla_ext.options.GLAConfig and GLA.recommended_defaults().
    """

    def __init__(self, **options):
        super().__init__()
        self.config = c = make_config(options)
        self.embed_dim, self.hidden_size = c.embed_dim, c.hidden_size
        self.window_size, self.seq_len = c.window_size, c.seq_len
        self.input_proj = (nn.Identity() if c.embed_dim == c.hidden_size
                           else nn.Linear(c.embed_dim, c.hidden_size, bias=True))
        self.blocks = nn.ModuleList(GLABlock(c) for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)

    # ---- construction and sizing (also gla_ext.build, gla_ext.param_count, ...) ----
    @staticmethod
    def build(**options) -> "GLA":
        """A GLA model from keyword options (embed_dim required); bad options raise OptionError."""
        return GLA(**options)

    build_gla_block = staticmethod(build_gla_block)
    build_gla_layer = staticmethod(build_gla_layer)
    output_size = staticmethod(sizing.output_size)
    param_count = staticmethod(sizing.param_count)
    recommended_defaults = staticmethod(sizing.recommended_defaults)

    # ---- running ----
    def forward(self, x, lengths=None, state=None, return_state=False, return_sequence=False,
                cp_group=None):
        """x [B, T, embed_dim] -> [B, hidden_size] (last position, or last valid one per row).

        lengths: int tensor [B], valid positions per row of a right-padded batch (1..T).
        state: from init_state() or a previous call; return_state=True also returns the
        new state. return_sequence=True returns every position, [B, T, hidden_size]
        (padded positions are zero).
        cp_group: context parallelism (gla_ext.distributed): x is this rank's slice along T
        of the same B sequences (T may be 0), every GLA layer runs through chunk_gla_cp over
        the group, and the result is this rank's slice of the outputs. Needs
        return_sequence=True; lengths, state and return_state are not supported with it.
        """
        if cp_group is not None:
            return self._forward_cp(x, cp_group, lengths, state, return_state, return_sequence)
        B, T = self._check_input(x)
        self._check_state(state, B)
        if lengths is not None:
            lengths = self._check_lengths(lengths, B, T, x.device)
        # fused C++ prefill on the CPU when it can run and is faster
        return _choice.run(
            self, "prefill", (B, T, return_sequence) + (() if lengths is None else ("padded",)),
            lambda: _prefill.try_forward(self, x, state, return_state, return_sequence, lengths),
            lambda: self.forward_layers(x, lengths, state, return_state, return_sequence),
            lambda rows: self._prefill_probes(x, state, lengths, rows))

    def _prefill_probes(self, x, state, lengths, rows):
        """(fused, plain, share): both paths on about the first `rows` rows of a prefill
        (whole rows first, then positions), and their share of the call's B * T rows, for
        engine_choice to measure on instead of the whole call."""
        B, T = x.shape[:2]
        b = min(B, rows)
        t = max(1, min(T, rows // b))
        xs, ss = x[:b, :t], None if state is None else [s[:b] for s in state]
        ls = None if lengths is None else lengths[:b].clamp(max=t)
        return (lambda: _prefill.try_forward(self, xs, ss, False, False, ls),
                lambda: self.forward_layers(xs, ls, ss), b * t / (B * T))

    def forward_layers(self, x, lengths=None, state=None, return_state=False,
                       return_sequence=False):
        """forward() through the PyTorch layers only (never the fused CPU engine): the plain
        path the engine is checked and timed against. Arguments as forward() (no cp_group)."""
        B, T = self._check_input(x)
        self._check_state(state, B)
        mask = None
        if lengths is not None:
            lengths = self._check_lengths(lengths, B, T, x.device)
            mask = torch.arange(T, device=x.device) < lengths[:, None]     # [B, T], True = valid
            # Zeroed padding cannot reach anything, even if it held inf or NaN.
            x = _zero_padding(x, mask)
        h = self.input_proj(x)
        new_state = []
        for i, block in enumerate(self.blocks):
            layer_state = None if state is None else state[i]
            if return_state:
                h, layer_state = block(h, layer_state, True, mask)
                new_state.append(layer_state)
            else:
                h = block(h, layer_state, False, mask)
        # The final LayerNorm is per position: pick the positions first, normalize only those.
        if return_sequence:
            y = self.norm(h)
            y = y if mask is None else _zero_padding(y, mask)
        elif lengths is None:
            y = self.norm(h[:, -1])
        else:
            y = self.norm(h[torch.arange(B, device=h.device), lengths - 1])
        return (y, new_state) if return_state else y

    def _forward_cp(self, x, cp_group, lengths, state, return_state, return_sequence):
        """forward() on this rank's slice; argument errors raise on every rank of cp_group."""
        from .distributed import check_cp_call
        error = None
        try:
            if not return_sequence:
                raise ValueError("cp_group needs return_sequence=True: each rank returns its "
                                 "slice of the outputs (the last position is on the last rank)")
            for name, value in (("lengths", lengths), ("state", state)):
                if value is not None:
                    raise ValueError(f"{name}= is not supported with cp_group (each rank holds "
                                     "a slice of full-length sequences)")
            if return_state:
                raise ValueError("return_state=True is not supported with cp_group")
            empty = isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] == 0
            # an empty slice (T = 0) is legal here: check it as if it had one position
            self._check_input(x.new_zeros(x.shape[0], 1, x.shape[2]) if empty else x)
        except (ValueError, TypeError) as e:
            error = e
        device = x.device if isinstance(x, torch.Tensor) else None
        B = x.shape[0] if error is None else 0
        check_cp_call("GLA.forward", cp_group, device, error, dict(batch=B))
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, cp_group=cp_group)
        return self.norm(h)

    def init_state(self, batch: int, device=None) -> list:
        """Zero recurrent state: a list with one [batch, num_heads, head_dim, head_dim] float32 per layer."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"init_state: batch must be a positive int, got {batch!r}")
        if device is None:
            device = self.norm.weight.device
        c = self.config
        return [torch.zeros(batch, c.num_heads, c.head_dim, c.head_dim, dtype=torch.float32,
                            device=device) for _ in range(c.num_layers)]

    def step(self, x_t, state=None):
        """One streaming step: x_t [B, embed_dim] (or [B, 1, embed_dim]) -> (y_t [B, hidden_size], new_state).

        state=None starts from zeros. Feeding a sequence one step at a time gives the
        outputs of forward(x, return_sequence=True) (in eval mode). The given state is
        never modified; the new state is made of fresh tensors.

        Fast path: on the CPU (backend "auto" or "cpu", float32 / bfloat16 / float16
        parameters with x_t of the same dtype and float32 states, matrices in that dtype or
        quantized by gla_ext.quantize_ (int8 / int4), compiled extension built),
        when autograd is not needed (torch.no_grad() / inference_mode, or nothing requires
        grad) and dropout is off (eval mode), the whole step runs as one fused C++ call
        (gla_ext.decode): the same math, several times faster for small batches. It keeps
        packed copies of the weights, refreshed when a parameter changes (in-place writes,
        new data, reassignment); after writing through `param.data` call
        gla_ext.decode.clear_cache(model). Otherwise, or where gla_ext.engine_choice
        measured the PyTorch layers faster for this batch size class, step_layers() runs.
        """
        if isinstance(x_t, torch.Tensor) and x_t.dim() == 2:
            x_t = x_t.unsqueeze(1)
        elif isinstance(x_t, torch.Tensor) and (x_t.dim() != 3 or x_t.shape[1] != 1):
            raise ValueError(f"step: x_t must be [batch, embed_dim] or [batch, 1, embed_dim], "
                             f"got shape {tuple(x_t.shape)}")
        return _choice.run(self, "step", (x_t.shape[0],),
                           lambda: _decode.try_step(self, x_t, state),
                           lambda: self.step_layers(x_t, state))

    def step_layers(self, x_t, state=None):
        """step() through the PyTorch layers only (never the fused CPU engine, decode or
        prefill): the plain path the engine is checked and timed against."""
        if isinstance(x_t, torch.Tensor) and x_t.dim() == 2:
            x_t = x_t.unsqueeze(1)
        if state is None:
            state = self.init_state(x_t.shape[0], device=x_t.device)
        return self.forward_layers(x_t, state=state, return_state=True)

    def state_pool(self, capacity: int):
        """A gla_ext.StatePool: slot-indexed recurrent states for up to `capacity` concurrent
        streams on the model's device, advanced in place by pool.step / pool.prefill."""
        from .serving import StatePool
        return StatePool(self, capacity)

    def cuda_graph_step(self, batch_size: int, warmup: int = 2):
        """A CUDA-graph-captured step() for a fixed batch (eval mode, model on CUDA).

        Returns a gla_ext.cuda_graph.CUDAGraphStep: call it with x_t [batch, embed_dim] for
        y_t [batch, hidden_size]; its state lives in static buffers (reset() zeroes them).
        """
        from .cuda_graph import CUDAGraphStep
        return CUDAGraphStep(self, batch_size, warmup)

    # ---- input checks: clear messages instead of shape errors deep inside ----
    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [batch, seq_len, embed_dim], "
                            f"got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [batch, seq_len, embed_dim={self.embed_dim}], "
                             f"got shape {tuple(x.shape)}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"x must have at least one row and one position, "
                             f"got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating tensor, got {x.dtype}")
        return x.shape[0], x.shape[1]

    def _check_state(self, state, B):
        if state is None:
            return
        c = self.config
        expected = (B, c.num_heads, c.head_dim, c.head_dim)
        if not isinstance(state, (list, tuple)) or len(state) != c.num_layers:
            raise ValueError(f"state must be a list of num_layers={c.num_layers} tensors "
                             f"{list(expected)} (see init_state), got {type(state).__name__}"
                             + (f" of length {len(state)}" if isinstance(state, (list, tuple)) else ""))
        for i, s in enumerate(state):
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != expected:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"state[{i}] must be a tensor of shape {list(expected)} "
                                 f"[batch, num_heads, head_dim, head_dim], got {got}")

    @staticmethod
    def _check_lengths(lengths, B, T, device):
        if not isinstance(lengths, torch.Tensor):
            lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.shape[0] != B:
            raise ValueError(f"lengths must be a 1-D tensor [batch={B}], got shape "
                             f"{tuple(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        lengths = lengths.to(device=device, dtype=torch.long)
        # Reading values would break torch.compile tracing; checked eagerly only.
        if not _is_tracing():
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 1 or hi > T:
                raise ValueError(f"lengths must be in [1, seq_len={T}], got values in [{lo}, {hi}]")
        return lengths


# Module-level names for the same functions (gla_ext.build, gla_ext.param_count, ...).
build = GLA.build
