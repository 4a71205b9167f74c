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

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from jax_roi.xla import sampling
from jax_roi.xla.contraction import accumulation_dtype, separable_gather_sum

# Above this many tap pairs per output the unrolled form compiles slowly; merge and loop.
_MAX_UNROLLED_PAIRS = 64


class Maps(NamedTuple):
    """One or several feature maps flattened to ``[N, C]`` rows, and where each box reads.

    ``base``, ``height``, ``width`` and ``scale`` are ``[K]``: the first row of the box's
    image on its map, that map's size and spatial scale. ``bound_h``/``bound_w`` are the
    static largest map sizes (they size the adaptive sample window).
    """

    flat: jnp.ndarray
    base: jnp.ndarray
    height: jnp.ndarray
    width: jnp.ndarray
    scale: jnp.ndarray
    live: jnp.ndarray
    bound_h: int
    bound_w: int


def single_map(features, rois, spatial_scale) -> Maps:
    num_images, height, width, channels = features.shape
    batch, live = sampling.live_boxes(rois, num_images)
    k = rois.shape[0]
    return Maps(features.reshape(num_images * height * width, channels), batch * (height * width),
                jnp.full((k,), height, jnp.int32), jnp.full((k,), width, jnp.int32),
                jnp.full((k,), spatial_scale, rois.dtype), live, height, width)


def pyramid_maps(levels, rois, level_ids, spatial_scales) -> Maps:
    """The levels of a pyramid as one row space: box ``k`` reads level ``level_ids[k]``.

    Concatenating the levels costs one copy of the features, and then every box is
    sampled once on its own level, in one pass (no per-level pass over all boxes).
    """
    num_images, channels = levels[0].shape[0], levels[0].shape[-1]
    batch, live = sampling.live_boxes(rois, num_images)
    sizes = [lvl.shape[1] * lvl.shape[2] for lvl in levels]
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + num_images * n)

    def per_level(values, dtype):
        return jnp.asarray(values, dtype)[level_ids]

    flat = jnp.concatenate([lvl.reshape(-1, channels) for lvl in levels], axis=0)
    base = per_level(offsets, jnp.int32) + batch * per_level(sizes, jnp.int32)
    return Maps(flat, base, per_level([lvl.shape[1] for lvl in levels], jnp.int32),
                per_level([lvl.shape[2] for lvl in levels], jnp.int32),
                per_level(spatial_scales, rois.dtype), live,
                max(lvl.shape[1] for lvl in levels), max(lvl.shape[2] for lvl in levels))


def _axes(maps: Maps, rois, output_size, sampling_ratio, aligned, quantize, normalize, window=None):
    """Both axes' taps. ``window``: ``(samples_y, samples_x)`` visited per bin, by default
    :func:`sampling.window_size` of the largest map (all that can contribute)."""
    oh, ow = output_size
    common = dict(live=maps.live, spatial_scale=maps.scale, sampling_ratio=sampling_ratio,
                  aligned=aligned, quantize=quantize, normalize=normalize)
    if window is None:
        window = _full_window(maps, sampling_ratio)
    taps_y = sampling.axis_taps(rois[:, 2], rois[:, 4], bins=oh, size=maps.height, bound=window[0], **common)
    taps_x = sampling.axis_taps(rois[:, 1], rois[:, 3], bins=ow, size=maps.width, bound=window[1], **common)
    return taps_y, taps_x


def _full_window(maps: Maps, sampling_ratio):
    return sampling.window_size(sampling_ratio, maps.bound_h), sampling.window_size(sampling_ratio, maps.bound_w)


def _largest_count(maps: Maps, rois, output_size, sampling_ratio, aligned, quantize):
    """The most samples per bin side over every box and both axes (a scalar)."""
    common = dict(live=maps.live, spatial_scale=maps.scale, sampling_ratio=sampling_ratio,
                  aligned=aligned, quantize=quantize)
    return jnp.maximum(sampling.largest_count(rois[:, 2], rois[:, 4], bins=output_size[0], **common),
                       sampling.largest_count(rois[:, 1], rois[:, 3], bins=output_size[1], **common))


def roi_align(features, rois, output_size, *, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
              reduction="avg", quantize=False):
    """Canonical-form RoIAlign (``quantize=True``: RoIWarp). Returns ``[K, oh, ow, C]``."""
    maps = single_map(features, rois, spatial_scale)
    out = sample_maps(maps, rois, output_size, sampling_ratio=sampling_ratio, aligned=aligned,
                      reduction=reduction, quantize=quantize)
    return out.astype(features.dtype)


def multilevel_roi_align(levels, rois, level_ids, output_size, *, spatial_scales, sampling_ratio=-1,
                         aligned=True):
    """RoIAlign (avg) of each box on its own pyramid level. Returns ``[K, oh, ow, C]``."""
    maps = pyramid_maps(levels, rois, level_ids, spatial_scales)
    out = sample_maps(maps, rois, output_size, sampling_ratio=sampling_ratio, aligned=aligned,
                      reduction="avg", quantize=False)
    return out.astype(levels[0].dtype)


def sample_maps(maps: Maps, rois, output_size, *, sampling_ratio, aligned, reduction, quantize):
    """Bilinear RoI sampling of every box on its map, in the accumulation dtype."""
    if quantize:
        aligned = False
    if reduction == "avg":
        return _align_avg(maps, rois, output_size, sampling_ratio, aligned, quantize)
    return _align_max(maps, rois, output_size, sampling_ratio, aligned, quantize)


def _align_avg(maps, rois, output_size, sampling_ratio, aligned, quantize):
    def contract(rows, w_rows, cols, w_cols, n_rows, n_cols, static):
        return separable_gather_sum(maps.flat, maps.base, rows * maps.width[:, None, None], w_rows, cols, w_cols,
                                    n_rows, n_cols, static)

    return contract_taps(maps, rois, output_size, sampling_ratio, aligned, quantize, contract)


def contract_taps(maps, rois, output_size, sampling_ratio, aligned, quantize, contract):
    """``contract(rows, w_rows, cols, w_cols, n_rows, n_cols, static)`` of the averaged
    taps of every bin as the gather-sum takes them: map rows and columns with their
    weights (``[K, oh, T]``, ``[K, ow, S]``), how many leading taps to visit, and whether
    all of them are visited unrolled (``static``)."""
    if sampling_ratio <= 0:
        return _contract_adaptive(maps, rois, output_size, aligned, quantize, contract)
    taps_y, taps_x = _axes(maps, rois, output_size, sampling_ratio, aligned, quantize, normalize=True)
    static = (2 * taps_y.bound) * (2 * taps_x.bound) <= _MAX_UNROLLED_PAIRS
    if static:
        rows, w_rows, _ = sampling.interleave(taps_y)
        cols, w_cols, _ = sampling.interleave(taps_x)
        n_rows = n_cols = jnp.int32(0)  # unused: every tap pair is visited
    else:
        rows, w_rows, counts_y = sampling.merge_taps(*sampling.interleave(taps_y))
        cols, w_cols, counts_x = sampling.merge_taps(*sampling.interleave(taps_x))
        n_rows, n_cols = jnp.max(counts_y, initial=0), jnp.max(counts_x, initial=0)
    return contract(rows, w_rows, cols, w_cols, n_rows, n_cols, static)


def _contract_adaptive(maps, rois, output_size, aligned, quantize, contract):
    """Adaptive sampling, on the smallest window of :func:`sampling.windows` that holds
    every bin's samples (a ``lax.switch``): the tap tables and the loops cost what the
    boxes present need, not what the largest possible box would. A window of ``w`` samples
    merges into at most ``w + 1`` distinct rows, so the smallest windows' tap pairs are
    unrolled into one pass, as with a fixed sampling ratio."""
    full = _full_window(maps, 0)

    def branch(window_y, window_x):
        def run(rois):
            taps_y, taps_x = _axes(maps, rois, output_size, 0, aligned, quantize, normalize=True,
                                   window=(window_y, window_x))
            rows, w_rows, counts_y = sampling.merge_runs(taps_y)
            cols, w_cols, counts_x = sampling.merge_runs(taps_x)
            static = rows.shape[-1] * cols.shape[-1] <= _MAX_UNROLLED_PAIRS // 2
            return contract(rows, w_rows, cols, w_cols, jnp.max(counts_y, initial=0), jnp.max(counts_x, initial=0),
                            static)

        return run

    choices = sampling.windows(max(full))
    need = _largest_count(maps, rois, output_size, 0, aligned, quantize)
    branches = [branch(min(w, full[0]), min(w, full[1])) for w in choices]
    return lax.switch(sampling.window_index(need, choices), branches, rois)


def _sample_value(flat, base, width, taps_y, taps_x, iy, ix, acc):
    """Bilinear value of sample ``(iy, ix)`` of every output cell; ``iy``/``ix`` are scalars
    or per-channel index arrays ``[K, P, Q, C]``."""
    per_channel = jnp.ndim(iy) == 4

    def axis(taps, i, expand):
        def pick(a):
            if per_channel:
                a = jnp.expand_dims(a, expand)  # [K, P, 1, G] or [K, 1, Q, G]
                a = jnp.broadcast_to(a, i.shape[:3] + a.shape[-1:])
                return jnp.take_along_axis(a, i, axis=-1)
            return jnp.expand_dims(lax.dynamic_index_in_dim(a, i, axis=2, keepdims=False), expand)[..., None]

        return pick(taps.lo), pick(taps.hi), pick(taps.w_lo), pick(taps.w_hi)

    y_lo, y_hi, wy_lo, wy_hi = axis(taps_y, iy, 2)
    x_lo, x_hi, wx_lo, wx_hi = axis(taps_x, ix, 1)
    value = 0
    channels = flat.shape[-1]
    for rows, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for cols, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            idx = base[:, None, None, None] + rows * width[:, None, None, None] + cols
            if per_channel:
                idx = idx * channels + jnp.arange(channels)
                v = flat.reshape(-1).at[idx].get(mode="promise_in_bounds")
            else:
                v = flat.at[idx[..., 0]].get(mode="promise_in_bounds")
            value = value + (wy * wx).astype(acc) * v.astype(acc)
    return value


def _align_max(maps, rois, output_size, sampling_ratio, aligned, quantize):
    flat, base, width = maps.flat, maps.base, maps.width
    acc = accumulation_dtype(flat.dtype)
    taps_y, taps_x = _axes(maps, rois, output_size, sampling_ratio, aligned, quantize, normalize=False)
    k, (oh, ow), channels = rois.shape[0], output_size, flat.shape[-1]
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
    return jnp.where(has, value, 0)
