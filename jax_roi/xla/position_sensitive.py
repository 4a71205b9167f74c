"""Position-sensitive RoIAlign and RoIPool (R-FCN) in pure JAX.

The input has ``C = C_out * oh * ow`` channels; output channel ``c`` of bin ``(ph, pw)``
reads only input channel ``(c * oh + ph) * ow + pw``. Both ops are averages that are
separable over the two axes, so each is one call of the gather-sum of ``contraction.py``
on the map with its channels regrouped as ``[B, H, W, oh * ow, C_out]``: the flat row
read for tap ``(t, s)`` of bin ``(ph, pw)`` is

    ((b * H + y_t) * W + x_s) * G + ph * ow + pw,      G = oh * ow

which splits into a row part ``y_t * W * G + ph * ow`` and a column part
``x_s * G + pw``, the two tap tables the gather-sum takes. Nothing of size
``[K, oh, ow, C]`` is formed.

* ``ps_roi_align``: torchvision's geometry, which is aligned RoIAlign's (half-pixel offset,
  no minimum size), bilinear samples averaged; the sample taps are RoIAlign's own
  (``sampling.axis_taps``), so boxes are differentiable as there.
* ``ps_roi_pool``: torchvision's forward: ends rounded half away from zero, the box at
  least one cell (``max(end - start, 1)``), bin edges ``floor(p * bin)`` and
  ``ceil((p + 1) * bin)`` from the start, both clipped to ``[0, size - 1]``, and the mean of
  the whole cells in ``[start, end)``; an empty bin is 0. The weights are ``1 / extent`` per
  axis, so the gradient is the forward's transpose. Boxes get none (rounding is flat).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jax_roi.xla import sampling
from jax_roi.xla.contraction import accumulation_dtype, separable_gather_sum


def _regrouped(features, output_size):
    """``[B * H * W * G, C_out]``: the map with channel ``(c * oh + ph) * ow + pw`` moved to
    row ``... * G + ph * ow + pw``, column ``c``."""
    num_images, height, width, channels = features.shape
    oh, ow = output_size
    groups = oh * ow
    regrouped = features.reshape(num_images, height, width, channels // groups, groups)
    return jnp.swapaxes(regrouped, -1, -2).reshape(num_images * height * width * groups, channels // groups)


def _group_offsets(rows, cols, width, output_size):
    """The gather-sum's row and column tables on the regrouped map: map row ``y`` of bin row
    ``ph`` is ``y * W * G + ph * ow``, map column ``x`` of bin column ``pw`` is ``x * G + pw``."""
    oh, ow = output_size
    groups = oh * ow
    ry = rows * (width * groups) + (jnp.arange(oh, dtype=jnp.int32) * ow)[None, :, None]
    rx = cols * groups + jnp.arange(ow, dtype=jnp.int32)[None, :, None]
    return ry, rx


def ps_roi_align(features, rois, output_size, *, spatial_scale=1.0, sampling_ratio=-1):
    """Canonical form: ``features [B, H, W, C_out * oh * ow]``, ``rois [K, 5]``. Returns
    ``[K, oh, ow, C_out]`` in the features' dtype."""
    from jax_roi.xla.roi_align import contract_taps, single_map  # one tap rule with RoIAlign

    width = features.shape[2]
    maps = single_map(features, rois, spatial_scale)
    base = maps.base * (output_size[0] * output_size[1])
    regrouped = _regrouped(features, output_size)

    def contract(rows, w_rows, cols, w_cols, n_rows, n_cols, static):
        ry, rx = _group_offsets(rows, cols, width, output_size)
        return separable_gather_sum(regrouped, base, ry, w_rows, rx, w_cols, n_rows, n_cols, static)

    out = contract_taps(maps, rois, output_size, sampling_ratio, aligned=True, quantize=False, contract=contract)
    return out.astype(features.dtype)


def _pool_axis(c1, c2, *, live, spatial_scale, bins, size):
    """``[K, bins]`` cell ranges ``[start, start + extent)`` of one axis, torchvision's
    ps_roi_pool forward rule (both edges clipped to ``[0, size - 1]``)."""
    c1 = jnp.where(live, c1, 0)
    c2 = jnp.where(live, c2, 0)
    scale = jnp.asarray(spatial_scale, c1.dtype)
    s, e = sampling.round_half_away(c1 * scale), sampling.round_half_away(c2 * scale)
    bin_size = sampling.exact_divide(jnp.maximum(e - s, 1), bins)[:, None]
    p = jnp.arange(bins, dtype=c1.dtype)[None, :]
    last = jnp.asarray(max(size - 1, 0), c1.dtype)
    start = jnp.clip(jnp.floor(p * bin_size) + s[:, None], 0, last)
    end = jnp.clip(jnp.ceil((p + 1) * bin_size) + s[:, None], 0, last)
    extent = jnp.where(live[:, None], jnp.maximum(end - start, 0), 0)
    return start.astype(jnp.int32), extent.astype(jnp.int32)


def _cell_taps(start, extent, size, dtype):
    """Tap tables ``[K, bins, size]`` of whole cells: ``start + t`` with weight
    ``1 / extent`` for ``t < extent`` (0 beyond, and for an empty bin)."""
    t = jnp.arange(max(size, 1), dtype=jnp.int32)[None, None, :]
    inside = t < extent[..., None]
    rows = jnp.where(inside, start[..., None] + t, 0)
    weight = jnp.where(inside, 1 / jnp.maximum(extent, 1).astype(dtype)[..., None], 0)
    return rows, weight


def ps_roi_pool(features, rois, output_size, *, spatial_scale=1.0):
    """Canonical form: ``features [B, H, W, C_out * oh * ow]``, ``rois [K, 5]``. Returns
    ``[K, oh, ow, C_out]`` in the features' dtype."""
    num_images, height, width, _ = features.shape
    oh, ow = output_size
    groups = oh * ow
    acc = accumulation_dtype(features.dtype)
    batch, live = sampling.live_boxes(rois, num_images)
    rois = lax.stop_gradient(rois)
    common = dict(live=live, spatial_scale=spatial_scale)
    y0, hy = _pool_axis(rois[:, 2], rois[:, 4], bins=oh, size=height, **common)
    x0, hx = _pool_axis(rois[:, 1], rois[:, 3], bins=ow, size=width, **common)
    rows, w_rows = _cell_taps(y0, hy, height, acc)
    cols, w_cols = _cell_taps(x0, hx, width, acc)
    ry, rx = _group_offsets(rows, cols, width, output_size)
    base = batch * (height * width * groups)
    out = separable_gather_sum(_regrouped(features, output_size), base, ry, w_rows, rx, w_cols,
                               jnp.max(hy, initial=0), jnp.max(hx, initial=0), False)
    return out.astype(features.dtype)
