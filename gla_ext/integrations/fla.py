"""Run flash-linear-attention GLA language models (fla.models.GLAForCausalLM) with gla_ext.

    from gla_ext.integrations import fla as gla_fla
    lm = gla_fla.load("path/to/fla-gla-checkpoint")          # or an fla GLAForCausalLM object
    out = lm.generate(input_ids, max_new_tokens=32)           # [B, T + 32] token ids

load() reads config.json and the weights (model.safetensors, pytorch_model.bin, or sharded
with an index json) with torch alone: neither fla nor transformers is imported for a
directory. The math is fla 0.6.0's GLA model (see fla_model.py); options it does not
implement raise NotImplementedError naming the option (see fla_config.py).

lm(input_ids) -> logits [B, T, vocab] float32: the chunked kernels (gla_ext.chunk_gla).
lm.generate(...): one chunked prefill over the prompt (one recurrent state per layer), then
one decode step per new token (fla_decode.Decoder: PackedLinear GEMVs on the CPU).
Progress: generate(progress=None) shows a bar on stderr when stderr is a terminal and
max_new_tokens >= PROGRESS_MIN_TOKENS; progress=True always shows it, False never.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from .checkpoint_files import read_config, read_weights
from .fla_config import FlaGLASettings, parse_config
from .fla_decode import Decoder
from .fla_model import FlaGLALM
from .fla_weights import map_state_dict

__all__ = ["load", "FlaGLALanguageModel", "PROGRESS_MIN_TOKENS"]

PROGRESS_MIN_TOKENS = 64
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.start = self.last = time.perf_counter()

    def update(self, done: int):
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self.total and now - self.last < 0.1:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        width = 30
        filled = int(width * done / max(self.total, 1))
        sys.stderr.write(f"\rgenerate [{'#' * filled}{'.' * (width - filled)}] "
                         f"{done}/{self.total} tokens, {rate:.1f} tok/s")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _check_ids(input_ids, vocab: int, device: torch.device) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got "
                        f"{type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq_len] with batch, seq_len >= 1, got "
                         f"shape {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids must lie in [0, {vocab}) (vocab_size), got values in "
                         f"[{lo}, {hi}]")
    return input_ids.to(device=device, dtype=torch.int64)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, generator):
    if not do_sample:
        return logits.argmax(-1)
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class FlaGLALanguageModel:
    """An fla GLA checkpoint on gla_ext kernels: call for logits, generate() for tokens."""

    def __init__(self, model: FlaGLALM):
        self.model = model
        self._decoder = None

    @property
    def settings(self) -> FlaGLASettings:
        return self.model.settings

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.weight_dtype

    def decoder(self) -> Decoder:
        """The decode-step object (built once: packs the weights for the CPU kernels)."""
        if self._decoder is None:
            self._decoder = Decoder(self.model)
        return self._decoder

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab_size] float32."""
        ids = _check_ids(input_ids, self.settings.vocab_size, self.device)
        return self.model(ids)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor):
        """(logits of the last position [B, vocab] float32, decode states) for a prompt."""
        ids = _check_ids(input_ids, self.settings.vocab_size, self.device)
        hidden, states = self.model.hidden_states(ids)
        return self.model.logits(hidden[:, -1]), self.decoder().kv_states(states)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, progress: bool | None = None):
        """Prompt [B, T] (equal lengths) -> [B, T + max_new_tokens] token ids (int64).

        Greedy by default; do_sample=True draws from softmax(logits / temperature), over
        the top_k most likely tokens when top_k is set (generator: a torch.Generator on the
        model's device, for reproducible draws)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
        ids = _check_ids(input_ids, self.settings.vocab_size, self.device)
        B, T = ids.shape
        out = torch.empty(B, T + max_new_tokens, dtype=torch.int64, device=self.device)
        out[:, :T] = ids
        if max_new_tokens == 0:
            return out
        if progress is None:
            progress = max_new_tokens >= PROGRESS_MIN_TOKENS and sys.stderr.isatty()
        bar = _Progress(max_new_tokens, bool(progress))
        logits, states = self.prefill(ids)
        decoder = self.decoder()
        for i in range(max_new_tokens):
            token = _pick(logits, do_sample, float(temperature), top_k, generator)
            out[:, T + i] = token
            if i + 1 < max_new_tokens:
                logits = decoder.step(token, states)
            bar.update(i + 1)
        return out


def _is_dir(obj) -> bool:
    return isinstance(obj, (str, os.PathLike))


def load(model_or_dir, device=None, dtype=None, quantize=None,
         group_size=None) -> FlaGLALanguageModel:
    """An fla GLA language model ready to run on gla_ext kernels.

    model_or_dir: an fla GLAForCausalLM (or anything with .config and .state_dict()), or a
    save_pretrained directory (config.json + safetensors / .bin weights; needs neither fla nor
    transformers). device: default the CPU for a directory, the model's device for an object.
    dtype: float32, bfloat16 or float16 for the weights; default the stored dtype.
    quantize: None, "int8" or "int4": gla_ext.quantize_(lm, quantize, group_size) after
    loading (see gla_ext.quantize; dtype then applies to the embedding and activations)."""
    if quantize is not None:
        from ..quantize import check_format
        check_format(quantize, group_size)   # bad arguments fail before reading any weights
    if _is_dir(model_or_dir):
        directory = os.fspath(model_or_dir)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"load: {directory!r} is not a directory")
        raw_config, state = read_config(directory), read_weights(directory)
        default_device = torch.device("cpu")
    elif hasattr(model_or_dir, "config") and hasattr(model_or_dir, "state_dict"):
        cfg = model_or_dir.config
        raw_config = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
        state = model_or_dir.state_dict()
        first = next(iter(state.values()), None)
        default_device = first.device if first is not None else torch.device("cpu")
    else:
        raise TypeError("load: model_or_dir must be an fla GLAForCausalLM or a checkpoint "
                        f"directory path, got {type(model_or_dir).__name__}")
    settings = parse_config(raw_config)
    weights = map_state_dict(state, settings)
    if dtype is None:
        dtype = weights.embed.dtype
    if dtype not in _DTYPES:
        raise ValueError(f"load: dtype must be one of {_DTYPES}, got {dtype}")
    device = default_device if device is None else torch.device(device)
    model = FlaGLALM(settings, weights, dtype).to(device)
    lm = FlaGLALanguageModel(model)
    if quantize is not None:
        from ..quantize import quantize_
        quantize_(lm, quantize, group_size)
    return lm


from .fla_accelerate import accelerate, accelerated, is_accelerated  # noqa: E402

__all__ += ["accelerate", "accelerated", "is_accelerated"]
