"""gla_ext: Gated Linear Attention as a compiled PyTorch extension."""
from . import reference
from ._ext import loaded as extension_loaded
from .ops import chunk_gla, fused_recurrent_gla
from .options import OptionError
from .model import GLA, build
from .layers import build_gla_block, build_gla_layer
from .sizing import output_size, param_count, recommended_defaults
from .serving import StatePool
from .quantize import quantize_

__version__ = "0.1.0"
__all__ = ["chunk_gla", "fused_recurrent_gla", "reference", "extension_loaded",
           "GLA", "build", "build_gla_block", "build_gla_layer", "output_size", "param_count",
           "recommended_defaults", "OptionError", "StatePool", "quantize_"]
