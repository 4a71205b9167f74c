"""Canonical-form ops on the XLA FFI kernels (same signatures and results as ``jax_roi.xla``).

Inputs are canonical and already checked by ``jax_roi._inputs`` (``features [B, H, W, C]``,
``rois [K, 5]`` (``[K, 6]`` for rotated boxes) in the coordinate dtype, static attributes as
Python values). Each op binds the forward kernel primitive (``primitives``); its batching
(``batching``) and derivatives (``differentiation``) are rules of the primitives, so every
JAX transform composes.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_roi.ffi import _loader
from jax_roi.ffi import batching as _batching  # noqa: F401  (registers the vmap rules)
from jax_roi.ffi import differentiation as _differentiation  # noqa: F401  (registers the derivatives)
from jax_roi.ffi import primitives
from jax_roi.ffi.targets import OpConfig


def _ensure_loaded():
    built, error = _loader.load()
    if not built:
        raise RuntimeError(f"jax_roi.ffi: the compiled kernels are unavailable: {error}")


def _single_level(rois):
    return jnp.zeros(rois.shape[:1], jnp.int32)


def roi_align(features, rois, output_size, *, spatial_scale=1.0, sampling_ratio=-1, aligned=True, reduction="avg",
              quantize=False, deterministic=False):
    """Canonical-form RoIAlign (``quantize=True``: RoIWarp) on the kernels: ``features
    [B, H, W, C]``, ``rois [K, 5]`` -> ``[K, oh, ow, C]``, as ``jax_roi.xla.roi_align``.
    ``deterministic``: on CUDA, a bitwise-reproducible feature gradient (a gather instead
    of atomics; slower); the CPU kernels are deterministic anyway."""
    _ensure_loaded()
    cfg = OpConfig("align", output_size, (spatial_scale,), sampling_ratio=sampling_ratio,
                   aligned=aligned and not quantize, reduction=reduction, quantize=quantize,
                   deterministic=deterministic)
    return primitives.forward(rois, _single_level(rois), (features,), cfg=cfg)


def multilevel_roi_align(levels, rois, level_ids, output_size, *, spatial_scales, sampling_ratio=-1, aligned=True,
                         deterministic=False):
    """Average RoIAlign of roi ``k`` on ``levels[level_ids[k]]`` (FPN), in ONE call.
    ``level_ids`` lie in ``[0, L)`` (the public op gives a box without a level a dead
    batch index)."""
    _ensure_loaded()
    cfg = OpConfig("align", output_size, tuple(spatial_scales), sampling_ratio=sampling_ratio, aligned=aligned,
                   deterministic=deterministic)
    return primitives.forward(rois, jnp.asarray(level_ids, jnp.int32), tuple(levels), cfg=cfg)


def roi_pool(features, rois, output_size, *, spatial_scale=1.0, binning="caffe", deterministic=False):
    """Canonical-form RoIPool on the kernels, as ``jax_roi.xla.roi_pool``."""
    _ensure_loaded()
    cfg = OpConfig("pool", output_size, (spatial_scale,), binning=binning, deterministic=deterministic)
    return primitives.forward(rois, _single_level(rois), (features,), cfg=cfg)


def ps_roi_align(features, rois, output_size, *, spatial_scale=1.0, sampling_ratio=-1, deterministic=False):
    """Canonical-form position-sensitive RoIAlign on the kernels: ``features [B, H, W,
    C_out*oh*ow]``, ``rois [K, 5]`` -> ``[K, oh, ow, C_out]``, as
    ``jax_roi.xla.position_sensitive.ps_roi_align``. Differentiable in features and boxes;
    ``deterministic`` as :func:`roi_align`."""
    _ensure_loaded()
    cfg = OpConfig("ps_align", output_size, (spatial_scale,), sampling_ratio=sampling_ratio,
                   deterministic=deterministic)
    return primitives.forward(rois, _single_level(rois), (features,), cfg=cfg)


def ps_roi_pool(features, rois, output_size, *, spatial_scale=1.0, deterministic=False):
    """Canonical-form position-sensitive RoIPool (the mean of whole cells) on the kernels,
    as ``jax_roi.xla.position_sensitive.ps_roi_pool``."""
    _ensure_loaded()
    cfg = OpConfig("ps_pool", output_size, (spatial_scale,), deterministic=deterministic)
    return primitives.forward(rois, _single_level(rois), (features,), cfg=cfg)


def roi_align_rotated(features, rois, output_size, *, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
                      deterministic=False):
    """Canonical-form rotated RoIAlign on the kernels: ``features [B, H, W, C]``, ``rois
    [K, 6]`` ``(batch, x_ctr, y_ctr, w, h, angle)`` -> ``[K, oh, ow, C]``, as
    ``jax_roi.xla.rotated.roi_align_rotated``. Differentiable in features and all five box
    numbers; ``deterministic`` as :func:`roi_align`."""
    _ensure_loaded()
    cfg = OpConfig("rotated", output_size, (spatial_scale,), sampling_ratio=sampling_ratio, aligned=aligned,
                   deterministic=deterministic)
    return primitives.forward(rois, _single_level(rois), (features,), cfg=cfg)
