"""StatePool: slot-indexed recurrent states for many concurrent streams (continuous batching).

    pool = model.state_pool(capacity=256)          # every layer's state for 256 streams
    a, b = pool.open(), pool.open()                # free slots with zero states
    y = pool.prefill(x, torch.tensor([a, b]), lengths=torch.tensor([7, 3]))   # prompts
    y = pool.step(x_t, torch.tensor([a, b]))       # one token for each stream
    pool.close(a)                                  # a can be handed out again by open()

The pool is one [capacity, num_heads, head_dim, head_dim] float32 tensor per layer on the
model's device (`pool.states`). step() and prefill() advance the named slots in place: the
ops read and write the pool rows through state_indices + inplace_final_state, so no state is
gathered or scattered by copies. Outputs equal the model run stream by stream:
pool.step == model.step(x_t, state) and pool.prefill == model(x, state=state, lengths=...,
return_state=True), each stream starting from its slot's state.

Inference only: step() and prefill() run under torch.no_grad(), so their outputs carry no
autograd history (train with model(...)). Dropout follows the model's mode, as in model.step;
call model.eval() for serving.

On the CPU, step() takes the fused C++ decode (gla_ext.decode.try_step_pool) when it can run
(float32 / 16-bit / int8 / int4 weights, extension built, no autograd, dropout off) and
gla_ext.engine_choice measured it faster for this many rows; otherwise, and on CUDA, the
layers run with the pool through fused_recurrent_gla / chunk_gla. prefill() takes the fused
C++ prefill (gla_ext.prefill, right-padded rows) on the same terms, with the named slots'
states gathered before and written back after; otherwise it packs the valid tokens of the
right-padded batch along T and runs the chunked kernels with cu_seqlens.

Bad arguments raise ValueError (TypeError for a non-tensor x) before anything is written:
slots out of range, repeated within one call, or not open (closed or never opened), and
wrong shapes, dtypes or devices. The pool is then unchanged.
"""
from __future__ import annotations

import heapq
import operator

import torch

from . import decode as _decode
from . import engine_choice as _choice
from . import prefill as _prefill
from ._checks import check_pool_rows

__all__ = ["StatePool", "PoolCUDAGraphStep"]


class StatePool:
    """Recurrent states of up to `capacity` streams of one GLA model (see the module docstring)."""

    def __init__(self, model, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"state_pool: capacity must be a positive int, got {capacity!r}")
        c = model.config
        self.model = model
        self.capacity = capacity
        self.device = model.norm.weight.device
        self.dtype = model.norm.weight.dtype
        self.state_shape = (c.num_heads, c.head_dim, c.head_dim)
        # One pool tensor per layer: the ops index its rows with state_indices.
        self.states = [torch.zeros(capacity, *self.state_shape, dtype=torch.float32,
                                   device=self.device) for _ in range(c.num_layers)]
        self._is_open = [False] * capacity
        self._free = list(range(capacity))     # a heap: open() hands out the lowest free slot

    # ---- slot bookkeeping ----
    def open(self) -> int:
        """A free slot with a zero state; RuntimeError when every slot is open."""
        if not self._free:
            raise RuntimeError(f"StatePool is full: all {self.capacity} slots are open; "
                               "close() one first or make a larger pool")
        slot = heapq.heappop(self._free)
        for s in self.states:
            s[slot].zero_()
        self._is_open[slot] = True
        return slot

    def close(self, slot) -> None:
        """Frees an open slot; using it again before open() returns it is a ValueError."""
        slot = self._check_slot(slot, "close")
        self._is_open[slot] = False
        heapq.heappush(self._free, slot)

    def is_open(self, slot) -> bool:
        slot = operator.index(slot)
        return 0 <= slot < self.capacity and self._is_open[slot]

    @property
    def num_open(self) -> int:
        return self.capacity - len(self._free)

    def get(self, slot) -> list:
        """The slot's state as a copy, laid out like model.init_state(1): a list with one
        [1, num_heads, head_dim, head_dim] float32 tensor per layer."""
        slot = self._check_slot(slot, "get")
        return [s[slot:slot + 1].clone() for s in self.states]

    def set(self, slot, state) -> None:
        """Copies `state` (the layout of model.init_state(1)) into an open slot."""
        slot = self._check_slot(slot, "set")
        expected = (1, *self.state_shape)
        if not isinstance(state, (list, tuple)) or len(state) != len(self.states):
            raise ValueError(f"set: state must be a list of num_layers={len(self.states)} tensors "
                             f"{list(expected)} (the layout of model.init_state(1)), got "
                             f"{type(state).__name__}"
                             + (f" of length {len(state)}" if isinstance(state, (list, tuple)) else ""))
        for i, s in enumerate(state):
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != expected:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"set: state[{i}] must be a tensor of shape {list(expected)}, "
                                 f"got {got}")
            if not s.dtype.is_floating_point:
                raise ValueError(f"set: state[{i}] must be a floating tensor, got {s.dtype}")
        for dst, src in zip(self.states, state):
            dst[slot].copy_(src[0])

    # ---- running ----
    def step(self, x_t, slots) -> torch.Tensor:
        """One token for each of n streams: x_t [n, embed_dim] (or [n, 1, embed_dim]), slots
        int [n] -> y_t [n, hidden_size]; the named slots advance in place."""
        x_t = self._check_x(x_t, "step")
        if x_t.dim() == 2:
            x_t = x_t.unsqueeze(1)
        elif x_t.shape[1] != 1:
            raise ValueError(f"step: x_t must be [n, embed_dim] or [n, 1, embed_dim], "
                             f"got shape {tuple(x_t.shape)}")
        slot_list = self._check_slots(slots, x_t.shape[0], "step")
        with torch.no_grad():
            index = torch.tensor(slot_list, dtype=torch.int64, device=self.device)
            if self._fused_step_pays(x_t):
                y = _decode.try_step_pool(self.model, x_t, self.states, index)
                if y is not None:
                    return y
            return self._generic_step(x_t, index)

    def prefill(self, x, slots, lengths=None) -> torch.Tensor:
        """Prompts for n streams: x [n, T, embed_dim], right-padded when `lengths` (int [n],
        1..T) is given -> the last valid position per row [n, hidden_size]; the named slots
        advance in place over each row's valid positions."""
        x = self._check_x(x, "prefill")
        if x.dim() != 3:
            raise ValueError(f"prefill: x must be [n, seq_len, embed_dim], got shape "
                             f"{tuple(x.shape)}")
        n, T = self.model._check_input(x)
        slot_list = self._check_slots(slots, n, "prefill")
        if lengths is not None:
            lengths = self.model._check_lengths(lengths, n, T, x.device)
        model = self.model
        with torch.no_grad():
            index = torch.tensor(slot_list, dtype=torch.int64, device=self.device)
            y = self._fused_prefill(x, index, lengths)
            if y is not None:
                return y
            # Pack the valid tokens of every row along T (B = 1): no work on padding.
            if lengths is None:
                packed = x.reshape(1, n * T, x.shape[-1])
                cu = torch.arange(0, (n + 1) * T, T, dtype=torch.int64, device=x.device)
            else:
                mask = torch.arange(T, device=x.device) < lengths[:, None]
                packed = x[mask].unsqueeze(0)
                cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            h = model.input_proj(packed)
            for block, pool in zip(model.blocks, self.states):
                h = block(h, pool, state_indices=index, cu_seqlens=cu)
            return model.norm(h[0, cu[1:] - 1])

    def cuda_graph_step(self, n: int, warmup: int = 2) -> "PoolCUDAGraphStep":
        """pool.step for a fixed number n of rows captured in a CUDA graph (model on CUDA, eval
        mode); see PoolCUDAGraphStep."""
        return PoolCUDAGraphStep(self, n, warmup)

    def _fused_step_pays(self, x_t) -> bool:
        """The measured choice (gla_ext.engine_choice) for a step of this many rows; measured
        at first use with dense steps from zero states (a pool step writes in place)."""
        model, n = self.model, x_t.shape[0]
        zeros = []      # made only when the class is measured

        def state():
            if not zeros:
                zeros.extend(model.init_state(n, device=x_t.device))
            return zeros
        return _choice.prefer_fused(model, "step", (n,),
                                    lambda: _decode.try_step(model, x_t, state()),
                                    lambda: model.step_layers(x_t, state()))

    def _fused_prefill(self, x, index, lengths):
        """prefill() through the fused C++ prefill when it can run and engine_choice measured
        it faster for this class (measured side-effect free, from the slots' states): the
        slots' states are gathered, advanced, and written back. None: the layers run."""
        model, (n, T) = self.model, x.shape[:2]
        if self.device.type != "cpu":
            return None
        state = [s.index_select(0, index) for s in self.states]
        key = (n, T, False) + (() if lengths is None else ("padded",))
        if not _choice.prefer_fused(
                model, "prefill", key,
                lambda: _prefill.try_forward(model, x, state, False, False, lengths),
                lambda: model.forward_layers(x, lengths, state)):
            return None
        out = _prefill.try_forward(model, x, state, True, False, lengths)
        if out is None:
            return None
        y, new_state = out
        for pool, s in zip(self.states, new_state):
            pool.index_copy_(0, index, s)
        return y

    def _generic_step(self, x_t, index):
        """The layers with the pool: fused_recurrent_gla reads and writes pool[index] in place."""
        model = self.model
        h = model.input_proj(x_t)
        for block, pool in zip(model.blocks, self.states):
            h = block(h, pool, state_indices=index)
        return model.norm(h[:, -1])

    # ---- checks: everything is validated before a pool row is touched ----
    def _check_slot(self, slot, op: str) -> int:
        if isinstance(slot, bool):
            raise ValueError(f"{op}: slot must be an int, got {slot!r}")
        try:
            slot = operator.index(slot)
        except TypeError:
            raise ValueError(f"{op}: slot must be an int, got {type(slot).__name__}") from None
        return self._check_slots([slot], 1, op)[0]

    def _slot_values(self, slots, n: int, op: str) -> list:
        """slots (int tensor or sequence of ints, [n]) as a Python list."""
        if isinstance(slots, torch.Tensor):
            if slots.dim() != 1 or slots.shape[0] != n:
                raise ValueError(f"{op}: slots must be a 1-D int tensor [n={n}] (one slot per "
                                 f"row of x), got shape {tuple(slots.shape)}")
            if slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
                raise ValueError(f"{op}: slots must be an integer tensor, got {slots.dtype}")
            return slots.tolist()
        try:
            values = [operator.index(s) for s in slots if not isinstance(s, bool)]
        except TypeError:
            values = None
        if values is None or len(values) != len(slots) or len(values) != n:
            raise ValueError(f"{op}: slots must be an int tensor [n={n}] (one slot per row of x), "
                             f"got {slots!r}")
        return values

    def _check_slots(self, slots, n: int, op: str, allow_padding: bool = False) -> list:
        """Range and distinctness by the ops' pool-row rule; StatePool adds only that a slot
        must be open."""
        values = self._slot_values(slots, n, op)
        check_pool_rows(op, values, self.capacity, "slots", f"capacity={self.capacity}",
                        allow_padding)
        for s in values:
            if s >= 0 and not self._is_open[s]:
                raise ValueError(f"{op}: slot {s} is not open (closed, or never opened); "
                                 "get one from open()")
        return values

    def _check_x(self, x, op: str):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
        E = self.model.embed_dim
        if x.dim() not in (2, 3) or x.shape[-1] != E or x.shape[0] < 1:
            raise ValueError(f"{op}: x must be [n, embed_dim={E}] (step) or [n, seq_len, "
                             f"embed_dim={E}] with n >= 1, got shape {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"{op}: x must have the model's dtype {self.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{op}: x is on {x.device} but the pool is on {self.device}")
        return x


class PoolCUDAGraphStep:
    """StatePool.step for a fixed number of rows, captured once in a CUDA graph.

        graph_step = pool.cuda_graph_step(n)      # model on CUDA, model.eval()
        y = graph_step(x_t, slots)                # x_t [n, embed_dim]; slots [n], -1 = unused row

    The input, the slot tensor and the output are static buffers on the model's device, so a
    call is two small copies and one graph launch. Rows with a negative slot are padding: no
    state is read or written for them and their output rows are zero. Slots are checked on
    the host before the replay (pass them as a list or a CPU tensor to avoid a device sync).
    The returned tensor is the static output buffer: valid until the next call.
    """

    def __init__(self, pool: StatePool, n: int, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("cuda_graph_step needs a CUDA device; none is available")
        if pool.device.type != "cuda":
            raise RuntimeError(f"cuda_graph_step: move the model to CUDA first (the pool is on "
                               f"{pool.device})")
        if pool.model.training:
            raise RuntimeError("cuda_graph_step: call model.eval() first (dropout would be "
                               "frozen into the graph)")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= pool.capacity:
            raise ValueError(f"cuda_graph_step: n must be an int in [1, capacity={pool.capacity}],"
                             f" got {n!r}")
        self.pool, self.n = pool, n
        device = pool.device
        self.x = torch.zeros(n, 1, pool.model.embed_dim, dtype=pool.dtype, device=device)
        # Warm-up and capture with every row padding: nothing is read or written in the pool.
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        with torch.cuda.device(device), torch.no_grad():
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._run()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):
                self.y = self._run()

    def _run(self):
        y = self.pool._generic_step(self.x, self.slots)
        return torch.where((self.slots >= 0)[:, None], y, torch.zeros((), dtype=y.dtype,
                                                                      device=y.device))

    def __call__(self, x_t, slots) -> torch.Tensor:
        pool = self.pool
        x_t = pool._check_x(x_t, "cuda_graph_step")
        if x_t.dim() == 2:
            x_t = x_t.unsqueeze(1)
        if tuple(x_t.shape) != tuple(self.x.shape):
            raise ValueError(f"cuda_graph_step: x_t must be [n={self.n}, embed_dim="
                             f"{pool.model.embed_dim}] (the captured shape), got "
                             f"{tuple(x_t.shape)}")
        values = pool._check_slots(slots, self.n, "cuda_graph_step", allow_padding=True)
        with torch.cuda.device(pool.device):
            self.slots.copy_(torch.tensor([max(s, -1) for s in values], dtype=torch.int64))
            self.x.copy_(x_t)
            self.graph.replay()
        return self.y
