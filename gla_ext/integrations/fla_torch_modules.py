"""Plain-PyTorch versions of the Triton-only pieces an fla GLA model reaches, with the math of
fla 0.6.0's kernels (float32 inside, outputs in the input's dtype). Autograd gives their
backward. Used by accelerate() on CPU tensors and by fla_reference_ops() in the tests.

    rms_norm / layer_norm               fla.modules.norm.layernorm (RMSNorm, LayerNorm)
    rms_norm_gated / layer_norm_gated   fla.modules.norm.fused_norm_gate (FusedRMSNormGated)
    swiglu / swiglu_linear              fla.modules.activations (GatedMLP, SwiGLULinear)
    swish_forward / swish_backward      SwishFunction (ACT2FN['swish'], the unfused output gate)
    cross_entropy_forward               FusedCrossEntropyLoss.forward
    linear_cross_entropy_forward        FusedLinearCrossEntropyLoss.forward
    causal_conv1d / causal_conv1d_update   fla.modules.causal_conv1d (ShortConvolution)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rms_norm", "layer_norm", "rms_norm_gated", "layer_norm_gated", "swiglu",
           "swiglu_linear", "swish_forward", "swish_backward", "cross_entropy_forward",
           "linear_cross_entropy_forward", "causal_conv1d", "causal_conv1d_update"]


def _normalize(x, weight, bias, residual, eps, residual_in_fp32, is_rms):
    """(y float32, residual_out): the sum x + residual is formed in float32 and stored in the
    residual's dtype (float32 with residual_in_fp32 and no residual), as fla's kernel does."""
    s = x.float()
    if residual is not None:
        s = s + residual.float()
        res_out = s.to(residual.dtype)
    else:
        res_out = s if residual_in_fp32 else x
    # torch's fused norms (one op each: decode steps are dominated by per-op overhead)
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    if is_rms:
        y = F.rms_norm(s, s.shape[-1:], w, eps)
        return (y if b is None else y + b), res_out
    return F.layer_norm(s, s.shape[-1:], w, b, eps), res_out


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


def _conv_activation(y, activation):
    if activation in ("silu", "swish"):
        return F.silu(y)
    if activation is not None:
        raise NotImplementedError(f"accelerate: causal_conv1d activation {activation!r} is not "
                                  "supported (silu / swish / None are)")
    return y


def _conv_one(x, weight, bias, h0, activation):
    """One sequence x [T, D], state h0 [D, W] (the last W inputs, newest last) ->
    (y [T, D] float32 before the residual, final state [D, W])."""
    W = h0.shape[-1]
    xx = torch.cat([h0.t().float(), x.float()])             # [W + T, D]: times -W .. T-1
    windows = xx[1:].unfold(0, W, 1)                        # [T, D, W]: times t-W+1 .. t
    y = (windows * weight.float()).sum(-1) if weight is not None else windows.sum(-1)
    if bias is not None:
        y = y + bias.float()
    return _conv_activation(y, activation), xx[-W:].t()


def causal_conv1d(x, weight=None, bias=None, residual=None, initial_state=None,
                  output_final_state=False, activation=None, backend=None, cu_seqlens=None,
                  cu_seqlens_cpu=None, chunk_indices=None, cp_context=None, **kwargs):
    """fla's causal_conv1d: y_t = act(sum_i w[:, i] x_{t-W+1+i} + b) (+ residual), x [B, T, D]
    (B == 1 with cu_seqlens), states [N, D, W] holding each sequence's last W inputs."""
    if cp_context is not None or kwargs:
        names = ["cp_context"] if cp_context is not None else sorted(kwargs)
        raise NotImplementedError(f"accelerate: causal_conv1d argument(s) {names} have no CPU "
                                  "version")
    if x.dim() != 3:
        raise NotImplementedError("accelerate: causal_conv1d on CPU takes x [B, T, D], got "
                                  f"shape {tuple(x.shape)}")
    W = weight.shape[-1] if weight is not None else initial_state.shape[-1]
    B, T, D = x.shape
    if cu_seqlens is None:
        pieces = [(b, x[b], slice(None)) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        pieces = [(n, x[0, bounds[n]:bounds[n + 1]], slice(bounds[n], bounds[n + 1]))
                  for n in range(len(bounds) - 1)]
    ys, finals = [], []
    for n, xs, _ in pieces:
        h0 = initial_state[n] if initial_state is not None else x.new_zeros(D, W)
        y, ht = _conv_one(xs, weight, bias, h0, activation)
        ys.append(y)
        finals.append(ht)
    y = torch.stack(ys) if cu_seqlens is None else torch.cat(ys).unsqueeze(0)
    if cu_seqlens is not None and y.shape[1] < T:      # tokens past cu_seqlens[-1]
        y = torch.cat([y, y.new_zeros(1, T - y.shape[1], D)], 1)
    if residual is not None:
        y = y + residual.float()
    final = torch.stack(finals).to(x.dtype) if output_final_state else None
    return y.to(x.dtype), final


def causal_conv1d_update(x, cache, residual=None, weight=None, bias=None, activation=None):
    """fla's decode step: one token per sequence (x [N, D], [N, 1, D] or [1, N, D]); cache
    [N, D, W] shifts left by one and takes x as its newest column, in place."""
    shape, D = x.shape, cache.shape[1]
    x2 = x.reshape(-1, D)
    with torch.no_grad():
        cache.copy_(torch.cat([cache[..., 1:], x2.unsqueeze(-1).to(cache.dtype)], -1))
    c = cache.float()
    y = (c * weight.float()).sum(-1) if weight is not None else c.sum(-1)
    if bias is not None:
        y = y + bias.float()
    y = _conv_activation(y, activation).view(shape)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype), cache
