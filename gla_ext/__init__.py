"""gla_ext: Gated Linear Attention as a compiled PyTorch extension."""
from . import reference
from ._ext import loaded as extension_loaded
from .ops import chunk_gla, fused_recurrent_gla

__version__ = "0.1.0"
__all__ = ["chunk_gla", "fused_recurrent_gla", "reference", "extension_loaded"]
