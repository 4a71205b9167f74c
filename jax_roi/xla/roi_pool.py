"""RoIPool (Fast R-CNN: quantized bins, max over whole cells) in pure JAX.

Canonical inputs (``features [B, H, W, C]``, ``rois [K, 5]``). A search over the cells
of each bin (no gradient; loops run to the largest bin actually present, so the cost
follows the boxes) finds the first maximal cell in row-major order; that cell is then
read again differentiably, so autodiff routes the gradient to it alone. Box coordinates
only pass through rounding, so boxes get no gradient (docs/semantics.md).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jax_roi.xla.contraction import accumulation_dtype
from jax_roi.xla.sampling import exact_divide, live_boxes, round_half_away


def _axis_bins(c1, c2, *, live, spatial_scale, bins, size, binning):
    """``[K, bins]`` half-open cell ranges ``[start, start + extent)`` clipped to the map."""
    dtype = c1.dtype
    c1 = jnp.where(live, c1, 0)
    c2 = jnp.where(live, c2, 0)
    scale = jnp.asarray(spatial_scale, dtype)
    p = jnp.arange(bins, dtype=dtype)
    if binning == "caffe":
        s, e = round_half_away(c1 * scale), round_half_away(c2 * scale)
        bin_size = exact_divide(jnp.maximum(e - s + 1, 1), bins)
        start = jnp.floor(p * bin_size[:, None]) + s[:, None]
        end = jnp.ceil((p + 1) * bin_size[:, None]) + s[:, None]
    else:  # "floor": the worked example's rule, last bin takes the remainder
        s, e = jnp.floor(c1 * scale), jnp.floor(c2 * scale)
        step = jnp.floor(exact_divide(e - s, bins))[:, None]
        start = s[:, None] + p * step
        end = jnp.where(p == bins - 1, e[:, None], s[:, None] + (p + 1) * step)
    start = jnp.clip(start, 0, size)
    end = jnp.clip(end, 0, size)
    extent = jnp.where(live[:, None], jnp.maximum(end - start, 0), 0)
    return start.astype(jnp.int32), extent.astype(jnp.int32)


def roi_pool(features, rois, output_size, *, spatial_scale=1.0, binning="caffe"):
    """Canonical-form RoIPool. Returns ``[K, oh, ow, C]``."""
    num_images, height, width, channels = features.shape
    oh, ow = output_size
    k = rois.shape[0]
    acc = accumulation_dtype(features.dtype)
    batch, live = live_boxes(rois, num_images)
    common = dict(live=live, spatial_scale=spatial_scale, binning=binning)
    y0, hy = _axis_bins(rois[:, 2], rois[:, 4], bins=oh, size=height, **common)
    x0, hx = _axis_bins(rois[:, 1], rois[:, 3], bins=ow, size=width, **common)
    base = (batch * (height * width))[:, None, None]
    flat = features.reshape(num_images * height * width, channels)
    sflat = lax.stop_gradient(flat)

    best = jnp.full((k, oh, ow, channels), -jnp.inf, acc)
    arg = jnp.full((k, oh, ow, channels), -1, jnp.int32)

    def over_y(dy, carry):
        def over_x(dx, carry):
            best, arg = carry
            cell = (y0[:, :, None] + dy) * width + (x0[:, None, :] + dx)  # [K, oh, ow]
            exists = (dy < hy)[:, :, None] & (dx < hx)[:, None, :]
            v = sflat.at[jnp.where(exists, base + cell, 0)].get(mode="promise_in_bounds").astype(acc)
            better = exists[..., None] & (v > best)
            return jnp.where(better, v, best), jnp.where(better, cell[..., None], arg)

        return lax.fori_loop(0, jnp.max(hx, initial=0), over_x, carry)

    best, arg = lax.fori_loop(0, jnp.max(hy, initial=0), over_y, (best, arg))
    has = arg >= 0
    idx = (base[..., None] + jnp.where(has, arg, 0)) * channels + jnp.arange(channels)
    value = flat.reshape(-1).at[idx].get(mode="promise_in_bounds")
    return jnp.where(has, value, jnp.zeros_like(value))
