"""accelerate(): unchanged flash-linear-attention (fla) GLA code on gla_ext's kernels.

    from gla_ext.integrations import fla as gla_fla
    gla_fla.accelerate()                  # fla's GLA ops -> gla_ext; Triton-only modules ->
    model = GLAForCausalLM(config)        # PyTorch on CPU tensors; fla's own code unchanged
    loss = model(ids, labels=ids).loss; loss.backward()
    gla_fla.accelerate(False)             # every patched object back as it was
    with gla_fla.accelerated(): ...       # the same, scoped

What is swapped (fla 0.6.0), in every fla module that bound it (fla_patching.Patch):
- chunk_gla / fused_recurrent_gla / fused_chunk_gla -> fla_ops_adapters (gla_ext ops) for CPU
  tensors, and for CUDA tensors too with cuda_ops=True (else fla's Triton ops stay);
- on CPU tensors only: rms_norm / layer_norm (RMSNorm, LayerNorm), rms_norm_gated /
  layer_norm_gated (FusedRMSNormGated), swiglu / swiglu_linear (GatedMLP), SwishFunction,
  FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss and causal_conv1d(_update)
  (ShortConvolution, use_short_conv) -> fla_torch_modules;
- fla's generation mixin hands transformers' `cache` back to fla as `past_key_values` (with
  transformers >= 5 fla 0.6.0's generate otherwise drops its recurrent state every step);
- hybrid `attn` layers (fla.layers.attn.Attention): flash-attn's functions (when flash-attn
  is not installed, or on CPU tensors) and fla's Triton rotary (CPU tensors) ->
  fla_torch_attention (torch's scaled_dot_product_attention);
- fused_attnres (attnres_block_size) raises NotImplementedError naming it on CPU tensors.
fla is imported by the first accelerate() call (so fla code imported after it sees the
swaps); fla modules first loaded while it is on bind the swapped objects and are restored too. Calling accelerate() again is harmless; accelerate(False) undoes everything.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch

from . import fla_torch_attention as ta
from . import fla_torch_modules as tm
from .fla_ops_adapters import make_adapters
from .fla_patching import Patch

__all__ = ["accelerate", "accelerated", "is_accelerated", "fla_gla_ops",
           "install_torch_modules"]

_lock = threading.RLock()
_active = {"patch": None, "cuda_ops": None}


def _import_fla():
    try:
        import fla  # noqa: F401  (imports fla.layers, fla.models, fla.modules, fla.ops)
        import fla.models.generation_utils  # noqa: F401
    except ImportError as exc:
        raise ImportError("accelerate() needs flash-linear-attention installed "
                          "(pip install fla-core flash-linear-attention transformers): "
                          f"{exc}") from exc


def fla_gla_ops() -> dict:
    """fla's own GLA op functions, by name (as defined in fla.ops.gla)."""
    from fla.ops.gla.chunk import chunk_gla
    from fla.ops.gla.fused_chunk import fused_chunk_gla
    from fla.ops.gla.fused_recurrent import fused_recurrent_gla
    return {"chunk_gla": chunk_gla, "fused_recurrent_gla": fused_recurrent_gla,
            "fused_chunk_gla": fused_chunk_gla}


def _first_tensor(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _on_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _dispatch(original, replacement, use_replacement):
    """Calls replacement when use_replacement(first tensor argument), else original."""
    if use_replacement is None:
        return replacement

    @functools.wraps(original)
    def run(*args, **kwargs):
        t = _first_tensor(args, kwargs)
        if t is not None and use_replacement(t):
            return replacement(*args, **kwargs)
        return original(*args, **kwargs)
    return run


def install_torch_modules(patch: Patch, use_torch=_on_cpu):
    """Swaps fla's Triton-only norm / swiglu / swish / cross-entropy / short-conv pieces for
    fla_torch_modules; use_torch(tensor) picks per call (None: always PyTorch)."""
    import fla.modules.activations.ops as act
    import fla.modules.causal_conv1d.ops as conv
    import fla.modules.norm.fused_norm_gate as norm_gate
    import fla.modules.norm.layernorm as layernorm
    from fla.modules import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss

    for original, ours in ((layernorm.rms_norm, tm.rms_norm),
                           (layernorm.layer_norm, tm.layer_norm),
                           (norm_gate.rms_norm_gated, tm.rms_norm_gated),
                           (norm_gate.layer_norm_gated, tm.layer_norm_gated),
                           (act.swiglu, tm.swiglu),
                           (act.swiglu_linear, tm.swiglu_linear),
                           (conv.causal_conv1d, tm.causal_conv1d),
                           (conv.causal_conv1d_update, tm.causal_conv1d_update)):
        patch.replace_function(original, _dispatch(original, ours, use_torch))
    # swish is SwishFunction.apply, also held by ACT2FN and by layers built earlier
    # (gate_fn): swap the Function's forward/backward themselves
    swish = act.SwishFunction
    patch.replace_attribute(swish, "forward", staticmethod(
        _dispatch(swish.forward, tm.swish_forward, use_torch)))
    patch.replace_attribute(swish, "backward", staticmethod(
        _dispatch(swish.backward, tm.swish_backward, use_torch)))
    for cls, ours in ((FusedCrossEntropyLoss, tm.cross_entropy_forward),
                      (FusedLinearCrossEntropyLoss, tm.linear_cross_entropy_forward)):
        patch.replace_attribute(cls, "forward", _dispatch(cls.forward, ours, use_torch))


def _missing_on_cpu(what: str):
    def refuse(*args, **kwargs):
        raise NotImplementedError(f"gla_ext accelerate: {what} has no CPU version; run it "
                                  "on CUDA with fla's kernels, or use a pure GLA config")
    return refuse


def _install_attention(patch: Patch):
    """Hybrid `attn` layers: fla's Attention takes flash-attn's functions and fla's Triton
    rotary; on CPU tensors (and wherever flash-attn is not installed) they run as
    fla_torch_attention (torch's scaled_dot_product_attention)."""
    import fla.layers.attn as fla_attn
    import fla.modules.rotary.ops as rotary
    for name in ("flash_attn_func", "flash_attn_varlen_func"):
        original, ours = getattr(fla_attn, name, None), getattr(ta, name)
        patch.replace_attribute(fla_attn, name, ours if original is None
                                else _dispatch(original, ours, _on_cpu))
    patch.replace_function(rotary.rotary_embedding, _dispatch(
        rotary.rotary_embedding, ta.rotary_embedding, _on_cpu))


def _install_guards(patch: Patch):
    """A clear error for the piece of fla models that cannot run on a CPU yet."""
    from fla.ops.attnres import fused_attnres
    patch.replace_function(fused_attnres, _dispatch(
        fused_attnres, _missing_on_cpu("fla's fused_attnres (attnres_block_size)"), _on_cpu))


def _install_generation_fix(patch: Patch):
    """transformers >= 5 passes the model's cache back as `cache=`; fla 0.6.0's models read
    `past_key_values`. Hand it over under the name fla expects (transformers untouched)."""
    from fla.models.generation_utils import FLAGenerationMixin
    original = FLAGenerationMixin.prepare_inputs_for_generation

    @functools.wraps(original)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = original(self, *args, **kwargs)
        if inputs.get("past_key_values") is None and inputs.get("cache") is not None:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    patch.replace_attribute(FLAGenerationMixin, "prepare_inputs_for_generation",
                            prepare_inputs_for_generation)


def _build(cuda_ops: bool) -> Patch:
    _import_fla()
    originals = fla_gla_ops()
    if cuda_ops:
        def takes(t):
            return t.device.type in ("cpu", "cuda")
    else:
        takes = _on_cpu
    patch = Patch()
    try:
        for name, adapter in make_adapters(originals, takes).items():
            patch.replace_function(originals[name], adapter)
        install_torch_modules(patch, _on_cpu)
        _install_attention(patch)
        _install_guards(patch)
        _install_generation_fix(patch)
    except BaseException:
        patch.undo()
        raise
    return patch


def accelerate(enable: bool = True, *, cuda_ops: bool = False) -> bool:
    """Turns gla_ext acceleration of fla's GLA code on (enable=True) or off; returns whether
    it is on. cuda_ops=True also routes CUDA tensors' GLA ops to gla_ext's CUDA kernels
    (fla's Triton norms / MLP / losses stay on CUDA either way)."""
    with _lock:
        patch = _active["patch"]
        if not enable:
            if patch is not None:
                patch.undo()
                _active.update(patch=None, cuda_ops=None)
            return False
        cuda_ops = bool(cuda_ops)
        if patch is not None and _active["cuda_ops"] == cuda_ops:
            return True
        if patch is not None:
            patch.undo()
            _active.update(patch=None, cuda_ops=None)
        _active.update(patch=_build(cuda_ops), cuda_ops=cuda_ops)
        return True


def is_accelerated() -> bool:
    return _active["patch"] is not None


@contextlib.contextmanager
def accelerated(*, cuda_ops: bool = False):
    """accelerate() for the duration of a with-block; the previous setting comes back after."""
    with _lock:
        before = _active["cuda_ops"]
        accelerate(True, cuda_ops=cuda_ops)
    try:
        yield
    finally:
        with _lock:
            if before is None:
                accelerate(False)
            else:
                accelerate(True, cuda_ops=before)
