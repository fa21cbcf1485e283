"""Build options of the GLA model: names, defaults, validation.

Every builder and sizing function (build, build_gla_block, build_gla_layer, output_size,
param_count) takes the same keyword options and validates them here, so a bad option
fails the same way everywhere, with its name in the message.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["OptionError", "GLAConfig", "make_config", "RECOMMENDED_DEFAULTS", "OPTION_NAMES"]


class OptionError(ValueError, TypeError):
    """A build option is unknown, missing, of the wrong type or out of range.

    It is both a ValueError and a TypeError, so callers may catch either; the message
    always starts with the option's name.
    """


# The seed's recommended configuration (GLA.recommended_defaults()).
RECOMMENDED_DEFAULTS = dict(hidden_size=256, num_layers=6, num_heads=4, head_dim=64,
                            expand_factor=2, window_size=60, dropout=0.1)

BACKEND_NAMES = ("auto", "cuda", "cpu", "reference")

_SEQ_LEN_FROM_WINDOW = object()  # seq_len not given: it follows window_size


@dataclass(frozen=True)
class GLAConfig:
    """Validated options. Field docs are the option docs."""
    embed_dim: int | None = None          # input features per position (required by build)
    hidden_size: int = 256                # model width, and the output size
    num_layers: int = 6                   # GLA blocks
    num_heads: int = 4                    # attention heads per layer
    head_dim: int = 64                    # key = value size per head (the state is head_dim^2)
    expand_factor: float = 2              # SwiGLU inner size = round(hidden_size * expand_factor)
    dropout: float = 0.1                  # after the attention and the FFN of each block
    window_size: int = 60                 # expected sequence length (a shape hint)
    seq_len: int | None = 60              # fixed input length hint; None = dynamic
    gate_low_rank_dim: int | None = None  # None: full gate projection; r: hidden->r->H*head_dim
    use_output_gate: bool = True          # o = norm(o) * silu(W_r x) (paper's swish gate)
    use_norm: bool = True                 # per-head RMSNorm over head_dim before the output gate
    gate_logit_normalizer: float = 16     # g = logsigmoid(W_g x) / gate_logit_normalizer
    norm_eps: float = 1e-5                # eps of every LayerNorm and RMSNorm
    backend: str = "auto"                 # ops backend: "auto", "cuda", "cpu" or "reference"

    @property
    def inner_size(self) -> int:
        """Width of the SwiGLU hidden layer."""
        return ffn_inner_size(self.hidden_size, self.expand_factor)

    @property
    def attn_dim(self) -> int:
        """Width of Q, K, V and the gates: num_heads * head_dim."""
        return self.num_heads * self.head_dim


OPTION_NAMES = tuple(GLAConfig.__dataclass_fields__)


def ffn_inner_size(hidden_size: int, expand_factor: float) -> int:
    return int(round(hidden_size * expand_factor))


def _positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "a positive int or None" if allow_none else "a positive int"
        raise OptionError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise OptionError(f"{name} must be >= 1, got {value}")
    return int(value)


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise OptionError(f"{name} must be finite, got {value}")
    return value


def _positive_real(name, value):
    value = _real(name, value)
    if value <= 0:
        raise OptionError(f"{name} must be > 0, got {value}")
    return value


def _probability(name, value):
    value = float(_real(name, value))
    if not 0.0 <= value <= 1.0:
        raise OptionError(f"{name} must be in [0, 1], got {value}")
    return value


def _flag(name, value):
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be True or False, got {value!r}")
    return value


def _backend(name, value):
    if value not in BACKEND_NAMES:
        raise OptionError(f"{name} must be one of {BACKEND_NAMES}, got {value!r}")
    return value


_CHECKS = {
    "embed_dim": lambda n, v: _positive_int(n, v, allow_none=True),
    "hidden_size": _positive_int,
    "num_layers": _positive_int,
    "num_heads": _positive_int,
    "head_dim": _positive_int,
    "expand_factor": _positive_real,
    "dropout": _probability,
    "window_size": _positive_int,
    "seq_len": lambda n, v: _positive_int(n, v, allow_none=True),
    "gate_low_rank_dim": lambda n, v: _positive_int(n, v, allow_none=True),
    "use_output_gate": _flag,
    "use_norm": _flag,
    "gate_logit_normalizer": _positive_real,
    "norm_eps": _positive_real,
    "backend": _backend,
}


def make_config(options: dict, require_embed_dim: bool = True, caller: str = "GLA.build") -> GLAConfig:
    """Validates keyword options (unknown, wrong type, out of range) into a GLAConfig."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise OptionError(f"{unknown[0]} is not an option of {caller}; unknown option(s) "
                          f"{unknown}. Options: {', '.join(OPTION_NAMES)}")
    if require_embed_dim and options.get("embed_dim") is None:
        raise OptionError(f"embed_dim is required by {caller} (the input feature size), "
                          "e.g. embed_dim=287")
    values = {name: _CHECKS[name](name, value) for name, value in options.items()}
    values.setdefault("seq_len", _SEQ_LEN_FROM_WINDOW)
    if values["seq_len"] is _SEQ_LEN_FROM_WINDOW:
        values["seq_len"] = values.get("window_size", GLAConfig.window_size)
    config = GLAConfig(**values)
    if config.inner_size < 1:
        raise OptionError(f"expand_factor={config.expand_factor} gives an FFN inner size of "
                          f"{config.inner_size} for hidden_size={config.hidden_size}; "
                          "it must be at least 1")
    return config
