"""Plain-PyTorch versions of the Triton-only pieces an fla GLA model reaches, with the math of
fla 0.6.0's kernels (float32 inside, outputs in the input's dtype). Autograd gives their
backward. Used by accelerate() on CPU tensors and by fla_reference_ops() in the tests.

    rms_norm / layer_norm               fla.modules.norm.layernorm (RMSNorm, LayerNorm)
    rms_norm_gated / layer_norm_gated   fla.modules.norm.fused_norm_gate (FusedRMSNormGated)
    swiglu / swiglu_linear              fla.modules.activations (GatedMLP, SwiGLULinear)
    swish_forward / swish_backward      SwishFunction (ACT2FN['swish'], the unfused output gate)
    cross_entropy_forward               FusedCrossEntropyLoss.forward
    linear_cross_entropy_forward        FusedLinearCrossEntropyLoss.forward
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rms_norm", "layer_norm", "rms_norm_gated", "layer_norm_gated", "swiglu",
           "swiglu_linear", "swish_forward", "swish_backward", "cross_entropy_forward",
           "linear_cross_entropy_forward"]


def _normalize(x, weight, bias, residual, eps, residual_in_fp32, is_rms):
    """(y float32, residual_out): the sum x + residual is formed in float32 and stored in the
    residual's dtype (float32 with residual_in_fp32 and no residual), as fla's kernel does."""
    s = x.float()
    if residual is not None:
        s = s + residual.float()
        res_out = s.to(residual.dtype)
    else:
        res_out = s if residual_in_fp32 else x
    if is_rms:
        y = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps)
    else:
        mean = s.mean(-1, keepdim=True)
        y = (s - mean) * torch.rsqrt((s - mean).square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y, res_out


def _norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms):
    y, res_out = _normalize(x, weight, bias, residual, eps, residual_in_fp32, is_rms)
    y = y.to(x.dtype)
    return (y, res_out) if prenorm else y


def rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    return _norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, True)


def layer_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    return _norm(x, weight, bias, residual, eps, prenorm, residual_in_fp32, False)


def _gate(y, g, activation):
    gf = g.float()
    if activation in ("swish", "silu"):
        return y * F.silu(gf)
    if activation == "sigmoid":
        return y * torch.sigmoid(gf)
    raise NotImplementedError(f"accelerate: norm gate activation {activation!r} is not "
                              "supported (swish, silu, sigmoid are)")


def _norm_gated(x, g, weight, bias, activation, residual, prenorm, residual_in_fp32, eps, is_rms):
    y, res_out = _normalize(x, weight, bias, residual, eps, residual_in_fp32, is_rms)
    y = _gate(y, g, activation).to(x.dtype)
    return (y, res_out) if prenorm else y


def rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                   residual_in_fp32=False, eps=1e-6):
    return _norm_gated(x, g, weight, bias, activation, residual, prenorm, residual_in_fp32,
                       eps, True)


def layer_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                     residual_in_fp32=False, eps=1e-6):
    return _norm_gated(x, g, weight, bias, activation, residual, prenorm, residual_in_fp32,
                       eps, False)


def swiglu(x, y):
    return (F.silu(x.float()) * y.float()).to(x.dtype)


def swiglu_linear(x, y, weight, bias):
    return F.linear(swiglu(x, y), weight, bias)


def swish_forward(ctx, x):
    ctx.save_for_backward(x)
    return F.silu(x.float()).to(x.dtype)


def swish_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    s = torch.sigmoid(x.float())
    return (dy.float() * s * (1 + x.float() * (1 - s))).to(x.dtype)


def _token_losses(logits, target, ignore_index, label_smoothing, logit_scale,
                  lse_square_scale, logit_softcapping):
    """Per-token float32 loss (z-loss included) and z-loss; 0 where target == ignore_index."""
    z = logits.float() * logit_scale
    if logit_softcapping is not None:
        z = logit_softcapping * torch.tanh(z / logit_softcapping)
    lse = torch.logsumexp(z, dim=-1)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target)).to(torch.int64)
    loss = -z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * z.sum(-1) / z.shape[-1]
    z_loss = lse_square_scale * lse * lse
    loss = loss + lse + z_loss
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(keep, loss, zero), torch.where(keep, z_loss, zero)


def cross_entropy_forward(self, input, target):
    """FusedCrossEntropyLoss.forward: the same reductions (mean divides by the number of
    targets that are not ignore_index) and return_z_loss."""
    if self.process_group is not None:
        raise NotImplementedError("accelerate: FusedCrossEntropyLoss with process_group "
                                  "(a vocabulary split over ranks) has no CPU version")
    loss, z_loss = _token_losses(input, target, self.ignore_index, self.label_smoothing,
                                 self.logit_scale, self.lse_square_scale,
                                 self.logit_softcapping)
    if self.reduction != "none":
        loss, z_loss = loss.sum(), z_loss.sum()
        if self.reduction == "mean":
            total = (target != self.ignore_index).sum()
            loss, z_loss = loss / total, z_loss / total
    return (loss, z_loss) if self.return_z_loss else loss


def linear_cross_entropy_forward(self, x, target, weight, bias=None):
    """FusedLinearCrossEntropyLoss.forward: logits = x W^T + b, cross entropy, mean over the
    targets that are not ignore_index (at least 1), l2warp's gradient on the max logit."""
    if self.process_group is not None:
        raise NotImplementedError("accelerate: FusedLinearCrossEntropyLoss with process_group "
                                  "has no CPU version")
    from fla.modules.l2warp import l2_warp     # plain PyTorch in fla
    x2, t = x.reshape(-1, x.shape[-1]), target.reshape(-1)
    logits = F.linear(x2, weight, bias)
    loss, _ = _token_losses(logits, t, self.ignore_index, self.label_smoothing,
                            self.logit_scale, 0.0, self.logit_softcapping)
    loss = loss.sum()
    if self.reduction == "mean":
        loss = loss / t.ne(self.ignore_index).sum().clamp_min(1)
    if self.use_l2warp:
        loss = l2_warp(loss, logits.unsqueeze(0), self.l2_penalty_factor)
    return loss
