"""AWQ for INT4 weights in ModelOpt's INT4_AWQ layout: a per-input-channel scale search (ModelOpt's awq_lite idea)
followed by a per-group clipping search (its awq_clip idea), both scored on the sampled calibration inputs.

Both searches minimise the output error of the quantized layer, E||x W^T - (x / s) Q(W s)^T||^2 over the sampled
input rows x. That error only depends on the inputs through their second moment H = x^T x / R, so H [in, in] is
computed once per layer and every candidate costs a product with H instead of a pass over the rows.

What comes out is still ModelOpt's format: `pre_quant_scale` = 1/s, and per group an INT4 scale = amax / 7, where
amax is the clipped group amax (codes clamp to [-8, 7], as ModelOpt's fake quantizer does with a shrunk amax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optiserve.kernels.formats import INT4_GROUP_SIZE, INT4_MAX, INT4_MIN
from optiserve.kernels.int4 import int4_groups, int4_scale_from_amax

from .calibrate import InputStats

# awq_lite's grid (ModelOpt's default alpha_step 0.1)
AWQ_ALPHAS = [i / 10 for i in range(11)]
CLIP_RATIOS = [round(0.5 + 0.05 * i, 4) for i in range(11)]  # awq_clip's grid: amax x 0.5, 0.55, ..., 1.0 ...
CLIP_REFINE_STEP = 0.025  # ... then, per group, its best ratio -/+ this
EPS = 1e-6
AWQ_SCALE_MIN, AWQ_SCALE_MAX = 1e-4, 1e4  # ModelOpt clamps the raw awq_lite scale to this range


@dataclass
class AWQResult:
    """AWQ's decision for one (possibly fused) linear with weight W [out, in]."""

    scale: torch.Tensor  # [in] s: the weight is quantized as W * s, the input enters as x / s
    group_amax: torch.Tensor  # [out, G] (clipped) amax of each group of W * s; the INT4 scale is amax / 7


def group_amax(w: torch.Tensor) -> torch.Tensor:
    """Per-group abs max [out, G] of w [out, in]."""
    return int4_groups(w).abs().amax(-1)


def fake_int4(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """w [out, in] through INT4 with group scales amax [out, G] / 7: the values `Int4Tensor` would dequantize to."""
    scale = int4_scale_from_amax(amax)[..., None]  # [out, G, 1]
    q = (int4_groups(w) / scale).round().clamp(INT4_MIN, INT4_MAX) * scale
    return q.flatten(1)[:, : w.shape[1]]


def input_gram(x: torch.Tensor) -> torch.Tensor:
    """Second moment H [in, in] = x^T x / R of the sampled input rows x [R, in]."""
    return x.t() @ x / max(x.shape[0], 1)


def output_error(w_err: torch.Tensor, h: torch.Tensor) -> float:
    """Mean squared output error E(x d^T)^2 over inputs and output channels, for a weight error w_err [out, in]."""
    return ((w_err @ h) * w_err).sum().item() / w_err.shape[0]


def mean_group_normalised_weight(w: torch.Tensor) -> torch.Tensor:
    """AWQ's weight statistic [in]: |w| divided by its group amax, averaged over the output rows."""
    g = int4_groups(w.abs())
    return (g / g.amax(-1, keepdim=True).clamp_min(EPS)).flatten(1)[:, : w.shape[1]].mean(0)


def channel_scale(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in] = mean|x|^alpha / w_mean^(1-alpha), normalised so that max(s) * min(s) = 1 (awq_lite's form)."""
    s = (x_mean.clamp_min(EPS).pow(alpha) / w_mean.clamp_min(EPS).pow(1 - alpha)).clamp(AWQ_SCALE_MIN, AWQ_SCALE_MAX)
    return (s / (s.max() * s.min()).sqrt()).clamp_min(EPS)


def smoothed_error(w: torch.Tensor, s: torch.Tensor, amax: torch.Tensor, h: torch.Tensor) -> float:
    """Output error of the layer quantized as Q(W s) with group amax [out, G], fed x / s."""
    return output_error(fake_int4(w * s, amax) / s - w, h)


def search_alpha(w: torch.Tensor, x_mean: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, float]:
    """awq_lite: the s [in] over the alpha grid whose INT4 layer (plain amax scales) has the least output error,
    and that error."""
    w_mean = mean_group_normalised_weight(w)
    candidates = [channel_scale(x_mean, w_mean, alpha) for alpha in AWQ_ALPHAS]
    errors = [smoothed_error(w, s, group_amax(w * s), h) for s in candidates]
    best = min(range(len(errors)), key=errors.__getitem__)
    return candidates[best], errors[best]


def group_blocks(h: torch.Tensor, groups: int) -> torch.Tensor:
    """The within-group diagonal blocks [G, 128, 128] of h [in, in] (zero-padded like the last group)."""
    pad = groups * INT4_GROUP_SIZE - h.shape[0]
    blocks = F.pad(h, (0, pad, 0, pad)).view(groups, INT4_GROUP_SIZE, groups, INT4_GROUP_SIZE)
    return blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def group_errors(w: torch.Tensor, amax: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Per group, the error [out, G] of its own output contribution when w [out, in] is quantized with amax."""
    d = (int4_groups(fake_int4(w, amax)) - int4_groups(w)).transpose(0, 1)  # [G, out, 128]
    return (torch.bmm(d, blocks) * d).sum(-1).t()


def search_clip(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """awq_clip: per group of w [out, in] (already smoothed; h is the Gram matrix of its inputs), the amax [out, G]
    shrunk by the ratio with the least error of that group's own output contribution: the best of CLIP_RATIOS,
    then of its two neighbours CLIP_REFINE_STEP away.

    Groups are scored independently (the diagonal blocks of h), as ModelOpt does; a ratio of 1.0 is in the grid,
    so no group's own error grows."""
    full = group_amax(w)  # [out, G]
    blocks = group_blocks(h, full.shape[1])
    best_err = torch.full_like(full, float("inf"))
    best_ratio = torch.ones_like(full)

    def try_ratios(ratio: torch.Tensor) -> None:  # ratio [out, G] (or broadcastable)
        nonlocal best_err, best_ratio
        err = group_errors(w, full * ratio, blocks)
        better = err < best_err
        best_err, best_ratio = torch.where(better, err, best_err), torch.where(better, ratio, best_ratio)

    for ratio in CLIP_RATIOS:
        try_ratios(torch.tensor(ratio))
    coarse = best_ratio
    for step in (-CLIP_REFINE_STEP, CLIP_REFINE_STEP):
        try_ratios((coarse + step).clamp(max(CLIP_RATIOS[0] - CLIP_REFINE_STEP, EPS), 1.0))
    return full * best_ratio


def awq(stats: InputStats, w: torch.Tensor) -> AWQResult:
    """AWQ for one linear with float weight w [out, in]: the scale search, then the clipping search on W * s.

    Per-row work only, so fused projections (q/k/v, gate/up) are searched as one weight and share one s.
    The clipping is kept only if it lowers the layer's full sampled output error (groups were scored alone)."""
    h = input_gram(stats.sample_rows())  # [in, in]
    s, plain_error = search_alpha(w, stats.channel_mean, h)
    ws = w * s
    clipped = search_clip(ws, h / (s[:, None] * s[None, :]))  # the smoothed inputs x / s have Gram H / (s s^T)
    if smoothed_error(w, s, clipped, h) > plain_error:
        clipped = group_amax(ws)
    return AWQResult(s, clipped)
