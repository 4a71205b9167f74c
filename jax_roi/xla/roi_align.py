"""RoIAlign and RoIWarp (bilinear RoI sampling) in pure JAX.

Both ops are the same sampler: RoIWarp is legacy RoIAlign on a box snapped to the feature
grid (``quantize=True``). Inputs are canonical (``features [B, H, W, C]``, ``rois [K, 5]``
in the coordinate dtype); the public API in ``jax_roi.ops`` does the checking.

* ``avg`` is separable: per-axis tap tables (``sampling.py``) feed one gather-sum
  (``contraction.py``). With a fixed ``sampling_ratio`` the ``2g x 2g`` tap pairs are
  unrolled so XLA fuses them into one pass; in adaptive mode the taps of each bin are
  merged by row and the loops run to the largest distinct-row count actually present, so
  the cost follows the boxes and not the adaptive cap.
* ``max`` is not separable. A search over the samples (no gradient) finds each output's
  winning sample (first in ``(iy, ix)`` row-major order on ties), then that one sample is
  evaluated again differentiably: autodiff sends the gradient to its four neighbours and,
  through its coordinates, to the box.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jax_roi.xla import sampling
from jax_roi.xla.contraction import accumulation_dtype, separable_gather_sum

# Above this many tap pairs per output the unrolled form compiles slowly; merge and loop.
_MAX_UNROLLED_PAIRS = 64


def _axes(features, rois, output_size, spatial_scale, sampling_ratio, aligned, quantize, normalize):
    num_images, height, width, _ = features.shape
    oh, ow = output_size
    batch, live = sampling.live_boxes(rois, num_images)
    common = dict(live=live, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                  aligned=aligned, quantize=quantize, normalize=normalize)
    taps_y = sampling.axis_taps(rois[:, 2], rois[:, 4], bins=oh, size=height, **common)
    taps_x = sampling.axis_taps(rois[:, 1], rois[:, 3], bins=ow, size=width, **common)
    return batch, taps_y, taps_x


def roi_align(features, rois, output_size, *, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
              reduction="avg", quantize=False):
    """Canonical-form RoIAlign (``quantize=True``: RoIWarp). Returns ``[K, oh, ow, C]``."""
    if quantize:
        aligned = False
    if reduction == "avg":
        return _align_avg(features, rois, output_size, spatial_scale, sampling_ratio, aligned, quantize)
    return _align_max(features, rois, output_size, spatial_scale, sampling_ratio, aligned, quantize)


def _align_avg(features, rois, output_size, spatial_scale, sampling_ratio, aligned, quantize):
    num_images, height, width, channels = features.shape
    batch, taps_y, taps_x = _axes(features, rois, output_size, spatial_scale, sampling_ratio, aligned,
                                  quantize, normalize=True)
    rows, w_rows, live_rows = sampling.interleave(taps_y)
    cols, w_cols, live_cols = sampling.interleave(taps_x)
    static = rows.shape[-1] * cols.shape[-1] <= _MAX_UNROLLED_PAIRS and sampling_ratio > 0
    if static:
        n_rows = n_cols = jnp.int32(0)  # unused: every tap pair is visited
    else:
        rows, w_rows, counts_y = sampling.merge_taps(rows, w_rows, live_rows)
        cols, w_cols, counts_x = sampling.merge_taps(cols, w_cols, live_cols)
        n_rows, n_cols = jnp.max(counts_y, initial=0), jnp.max(counts_x, initial=0)
    flat = features.reshape(num_images * height * width, channels)
    base = batch * (height * width)
    out = separable_gather_sum(flat, base, rows * width, w_rows, cols, w_cols, n_rows, n_cols, static)
    return out.astype(features.dtype)


def _sample_value(flat, base, width, taps_y, taps_x, iy, ix, acc):
    """Bilinear value of sample ``(iy, ix)`` of every output cell; ``iy``/``ix`` are scalars
    or per-channel index arrays ``[K, P, Q, C]``."""
    per_channel = jnp.ndim(iy) == 4

    def axis(taps, i, expand):
        def pick(a):
            if per_channel:
                a = jnp.expand_dims(a, expand)  # [K, P, 1, G] or [K, 1, Q, G]
                a = jnp.broadcast_to(a, i.shape[:3] + a.shape[-1:])
                return jnp.take_along_axis(a, i.reshape(i.shape[:3] + (-1,)), axis=-1).reshape(i.shape)
            return jnp.expand_dims(lax.dynamic_index_in_dim(a, i, axis=2, keepdims=False), expand)[..., None]

        return pick(taps.lo), pick(taps.hi), pick(taps.w_lo), pick(taps.w_hi)

    y_lo, y_hi, wy_lo, wy_hi = axis(taps_y, iy, 2)
    x_lo, x_hi, wx_lo, wx_hi = axis(taps_x, ix, 1)
    value = 0
    channels = flat.shape[-1]
    for rows, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for cols, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            idx = base[:, None, None, None] + rows * width + cols
            if per_channel:
                idx = idx * channels + jnp.arange(channels)
                v = flat.reshape(-1).at[idx].get(mode="promise_in_bounds")
            else:
                v = flat.at[idx[..., 0]].get(mode="promise_in_bounds")
            value = value + (wy * wx).astype(acc) * v.astype(acc)
    return value


def _align_max(features, rois, output_size, spatial_scale, sampling_ratio, aligned, quantize):
    num_images, height, width, channels = features.shape
    acc = accumulation_dtype(features.dtype)
    batch, taps_y, taps_x = _axes(features, rois, output_size, spatial_scale, sampling_ratio, aligned,
                                  quantize, normalize=False)
    flat = features.reshape(num_images * height * width, channels)
    base = batch * (height * width)
    k, (oh, ow) = rois.shape[0], output_size
    gx_bound = taps_x.bound

    # Search (no gradient): the running maximum over the samples that exist, and where it is.
    sy, sx, sflat = (lax.stop_gradient(t) for t in (taps_y, taps_x, flat))
    count_y, count_x = taps_y.count, taps_x.count
    best = jnp.full((k, oh, ow, channels), -jnp.inf, acc)
    arg = jnp.full((k, oh, ow, channels), -1, jnp.int32)

    def over_y(iy, carry):
        def over_x(ix, carry):
            best, arg = carry
            v = _sample_value(sflat, base, width, sy, sx, iy, ix, acc)
            exists = ((iy < count_y) & (ix < count_x))[:, None, None, None]
            better = exists & (v > best)
            return jnp.where(better, v, best), jnp.where(better, iy * gx_bound + ix, arg)

        return lax.fori_loop(0, jnp.max(count_x, initial=0), over_x, carry)

    best, arg = lax.fori_loop(0, jnp.max(count_y, initial=0), over_y, (best, arg))
    # Evaluate the winner again, differentiably; a bin without samples is 0.
    has = arg >= 0
    safe = jnp.where(has, arg, 0)
    value = _sample_value(flat, base, width, taps_y, taps_x, safe // gx_bound, safe % gx_bound, acc)
    return jnp.where(has, value, 0).astype(features.dtype)
