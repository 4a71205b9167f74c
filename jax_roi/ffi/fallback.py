"""The kernel primitives' meaning in pure JAX (``jax_roi.xla``).

Used where the kernels have nothing to offer: the lowering on a platform without kernels
(TPU, ROCm), and the forward-mode derivatives that no kernel computes (the boxes' tangent,
the tangents of the max reductions, and second derivatives through the backward). Every
function here takes the primitives' operands in their ungrouped form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_roi import xla as _xla
from jax_roi.ffi.targets import OpConfig
from jax_roi.xla import position_sensitive, rotated
from jax_roi.xla.contraction import accumulation_dtype  # one rule for every path


def forward(cfg: OpConfig, rois, level, features):
    """``[K, oh, ow, C]``: roi ``k`` on ``features[level[k]]``."""
    if cfg.kind == "ps_align":
        return position_sensitive.ps_roi_align(features[0], rois, cfg.output_size, spatial_scale=cfg.scales[0],
                                               sampling_ratio=cfg.sampling_ratio)
    if cfg.kind == "rotated":
        return rotated.roi_align_rotated(features[0], rois, cfg.output_size, spatial_scale=cfg.scales[0],
                                         sampling_ratio=cfg.sampling_ratio, aligned=cfg.aligned)
    if cfg.kind == "ps_pool":
        return position_sensitive.ps_roi_pool(features[0], rois, cfg.output_size, spatial_scale=cfg.scales[0])
    if cfg.kind == "pool":
        return _xla.roi_pool(features[0], rois, cfg.output_size, spatial_scale=cfg.scales[0], binning=cfg.binning)
    if len(features) == 1:
        return _xla.roi_align(features[0], rois, cfg.output_size, spatial_scale=cfg.scales[0],
                              sampling_ratio=cfg.sampling_ratio, aligned=cfg.aligned, reduction=cfg.reduction,
                              quantize=cfg.quantize)
    return _xla.multilevel_roi_align(features, rois, level, cfg.output_size, spatial_scales=cfg.scales,
                                     sampling_ratio=cfg.sampling_ratio, aligned=cfg.aligned)


def tangent(cfg: OpConfig, d_rois, d_features, rois, level, features):
    """The forward's tangent along ``(d_rois, d_features)``."""
    return jax.jvp(lambda r, fs: forward(cfg, r, level, fs), (rois, tuple(features)),
                   (d_rois, tuple(d_features)))[1]


def backward(cfg: OpConfig, rois_grad: bool, factor: int, cot, rois, level, features):
    """``(d_rois, *d_features)`` as the backward target returns them: the features'
    gradients in the accumulation dtype with ``factor * B`` images (roi index ``b`` reads
    image ``b % B``, which tiling the maps reproduces)."""
    tiled = tuple(jnp.tile(f, (factor, 1, 1, 1)) if factor > 1 else f for f in features)
    _, vjp = jax.vjp(lambda r, fs: forward(cfg, r, level, fs), rois, tiled)
    d_rois, d_features = vjp(cot.astype(features[0].dtype))
    if not (rois_grad and cfg.has_box_gradient):
        d_rois = jnp.zeros_like(rois)
    acc = accumulation_dtype(features[0].dtype)
    return (d_rois, *(d.astype(acc) for d in d_features))
