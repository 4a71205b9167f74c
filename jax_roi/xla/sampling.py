r"""Per-axis geometry of RoIAlign / RoIWarp sampling, in pure JAX.

Bilinear RoI sampling is separable: a sample at ``(y, x)`` reads

.. math::  v = \sum_{a \in \{y_0, y_1\}} \sum_{b \in \{x_0, x_1\}} w^y_a\, w^x_b\, f[a, b]

and both its validity test (``-1 <= y <= H`` and ``-1 <= x <= W``) and the average over the
``g_y \times g_x`` samples of a bin factor into a y part and an x part. So everything about
a box is computed on each axis alone, as ``[K, bins, G]`` tables (``G`` the static bound of
the per-bin sample count), and the 2-D work is left to the contraction. Every function is
plain differentiable JAX: the box gradient is ``jax.grad`` through these tables, with each
clamp differentiated as the piecewise function it is (docs/semantics.md).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax


class AxisTaps(NamedTuple):
    """Bilinear taps of every sample along one axis.

    ``lo``/``hi`` are the two neighbouring rows (or columns), ``w_lo``/``w_hi`` their
    weights with validity folded in (zero for an out-of-range sample, a sample past the
    bin's count, or a dead box), all ``[K, bins, G]``. ``count`` is the per-box sample count
    ``g`` (``[K]`` int32, possibly <= 0 for an empty bin) and ``bound`` its static bound.
    """

    lo: jnp.ndarray
    hi: jnp.ndarray
    w_lo: jnp.ndarray
    w_hi: jnp.ndarray
    valid: jnp.ndarray
    count: jnp.ndarray
    bound: int


def round_half_away(v: jnp.ndarray) -> jnp.ndarray:
    """``std::round``: half away from zero (``jnp.round`` rounds half to even)."""
    a = jnp.abs(v)
    r = jnp.floor(a)
    r = r + (a - r >= 0.5)
    return jnp.sign(v) * r


def _unfused(value):
    """Hides ``value`` from XLA's algebraic rewrites, which are not exact in float: it would
    contract ``a*b + c`` into a fused multiply-add. Box and sample coordinates must round
    exactly as torchvision and the kernels do, or a sample landing on the map's edge
    (``x == W``) flips validity."""
    return lax.optimization_barrier(value)


def exact_divide(numerator, denominator):
    """IEEE division. XLA rewrites ``a / c`` for a constant or broadcast ``c`` into
    ``a * (1/c)``, which is off by an ulp (``7/3`` gives 2.3333335, not 2.3333333, and
    ``ceil(3 * bin)`` becomes 8 instead of 7). A divisor that depends on the numerator
    (``numerator * 0 + c``, which IEEE arithmetic does not let XLA fold) keeps the true
    division, under ``vmap`` too. The dependence is a device only, so it carries no
    derivative (an overflowed numerator would otherwise turn it into ``inf * 0``)."""
    return numerator / _unfused(lax.stop_gradient(numerator) * 0 + denominator)


def live_boxes(rois, num_images):
    """Batch indices (truncated like torchvision's ``int()``) and which boxes are live: all
    coordinates finite and the batch index inside ``[0, B)``. Dead boxes read index 0."""
    finite = jnp.all(jnp.isfinite(rois), axis=1)
    batch = jnp.trunc(jnp.clip(jnp.where(finite, rois[:, 0], -1), -1, num_images)).astype(jnp.int32)
    live = finite & (batch >= 0) & (batch < num_images)
    return jnp.where(live, batch, 0), live


def window_size(sampling_ratio: int, size: int) -> int:
    """Static number of samples visited per bin side.

    A fixed ``sampling_ratio`` visits all its samples. In adaptive mode the count
    ``ceil(bin)`` has no cap (torchvision's rule), so a box far larger than the map has
    any number of samples, but only those with ``-1 <= pos <= size`` contribute; when there
    are more than ``2*size + 6`` samples their spacing ``bin / ceil(bin)`` is at least 0.5,
    so a window of that many consecutive samples holds every contributing one (with a
    sample of margin at each end for the rounding of the window's start)."""
    return sampling_ratio if sampling_ratio > 0 else 2 * size + 6


def _axis_geometry(c1, c2, *, live, spatial_scale, bins: int, sampling_ratio: int, aligned: bool,
                   quantize: bool):
    """One axis of every box: ``(live, c1, c2, start, bin_size, count)``, all ``[K]``:
    liveness (also False for a box whose length overflows), the coordinates (zeroed for a
    dead box), where the first bin starts, the bin size and the samples per bin
    (``sampling_ratio``, or adaptive ``ceil(bin_size)``; 0 for a dead box), in the
    coordinate dtype."""
    dtype = c1.dtype
    scale = jnp.asarray(spatial_scale, dtype)
    # A box whose length overflows (finite ends 6e38 apart in float32) has no finite
    # sample: like a non-finite box it gives zeros, and its coordinates are zeroed first.
    live = live & jnp.isfinite(lax.stop_gradient(c2 * scale - c1 * scale))
    c1 = jnp.where(live, c1, 0)
    c2 = jnp.where(live, c2, 0)
    c1s, c2s = _unfused(c1 * scale), _unfused(c2 * scale)
    if quantize:  # RoIWarp: the box is snapped to the feature grid, then sampled as legacy RoIAlign.
        start, end = round_half_away(c1s), round_half_away(c2s)
    else:
        offset = jnp.asarray(0.5 if aligned else 0.0, dtype)
        start, end = c1s - offset, c2s - offset
    length = end - start
    if not (aligned and not quantize):  # legacy: a malformed box becomes one pixel wide
        length = jnp.where(length <= 1, jnp.ones_like(length), length)  # clamped at 1 too (zero derivative)
    bin_size = exact_divide(length, bins)

    if sampling_ratio > 0:
        count_f = jnp.full(c1.shape, sampling_ratio, dtype)
    else:
        # ceil(bin) samples, kept in the coordinate dtype: for an absurd box it exceeds
        # every integer range, and it is only ever a divisor and a bound.
        count_f = lax.stop_gradient(jnp.ceil(bin_size))
        count_f = jnp.where(jnp.isfinite(count_f) & (count_f > 0), count_f, 0)
    count_f = jnp.where(live, count_f, 0)
    return live, c1, c2, start, bin_size, count_f


def largest_count(c1, c2, *, live, spatial_scale, bins: int, sampling_ratio: int, aligned: bool,
                  quantize: bool):
    """The most samples any bin of these boxes has along this axis (a scalar, coordinate
    dtype): what the smallest sufficient window of :func:`windows` is chosen by."""
    count = _axis_geometry(c1, c2, live=live, spatial_scale=spatial_scale, bins=bins,
                           sampling_ratio=sampling_ratio, aligned=aligned, quantize=quantize)[-1]
    return jnp.max(count, initial=0)


def windows(full: int) -> tuple[int, ...]:
    """The static sample windows adaptive tap tables are built for, smallest first: 4 and
    16 where below ``full`` (:func:`window_size`), then ``full``. Every table costs its
    window, so boxes whose bins all have few samples (a box head's have at most 4) should
    not pay for the full window, which only the largest boxes need. Each window is one
    more branch to compile, hence few."""
    return tuple(w for w in (4, 16) if w < full) + (full,)


def axis_taps(c1, c2, *, live, spatial_scale, bins: int, size, bound: int, sampling_ratio: int,
              aligned: bool, quantize: bool, normalize: bool) -> AxisTaps:
    """Sample taps of one axis for ``K`` boxes spanning ``[c1, c2]`` in image pixels.

    ``size`` and ``spatial_scale`` are scalars, or ``[K]`` arrays when the boxes sit on
    maps of different sizes (the levels of a feature pyramid); ``bound`` is the static
    number of samples visited per bin (:func:`window_size` of the largest map).

    ``live`` ([K] bool) is False for a box that must give zeros and no gradient (a
    non-finite coordinate or a batch index outside the batch); its coordinates are
    replaced by 0 before any arithmetic so that no NaN reaches the gradient.
    ``normalize`` folds the average's ``1 / g`` into the weights.
    """
    dtype = c1.dtype
    live, c1, c2, start, bin_size, count_f = _axis_geometry(
        c1, c2, live=live, spatial_scale=spatial_scale, bins=bins, sampling_ratio=sampling_ratio,
        aligned=aligned, quantize=quantize)
    size = jnp.broadcast_to(jnp.asarray(size, jnp.int32), c1.shape)
    divisor = jnp.maximum(count_f, 1)

    p = jnp.arange(bins, dtype=dtype)[None, :]
    corner = start[:, None] + _unfused(p * bin_size[:, None])  # [K, bins]: where each bin begins
    if sampling_ratio > 0:
        first = jnp.zeros_like(corner)
    else:
        # More samples than the window: start it one sample before the first that can
        # reach -1 (positions grow by bin / count per sample).
        wide = (count_f > bound)[:, None]
        step = lax.stop_gradient(jnp.where(wide[:, 0], bin_size, 1) / jnp.where(wide[:, 0], divisor, 1))
        guess = jnp.floor(lax.stop_gradient((-1 - corner) / step[:, None] - 0.5)) - 1
        first = jnp.where(wide, jnp.clip(guess, 0, (count_f - bound)[:, None]), 0)
        first = jnp.where(jnp.isfinite(first), first, 0)
    i = first[:, :, None] + jnp.arange(bound, dtype=dtype)[None, None, :]  # [K, bins, bound]
    # Same association as torchvision: (start + p*bin) + ((i + 0.5) * bin) / g.
    offset = (i + 0.5) * bin_size[:, None, None]
    # An absurd box overflows the offset; such a sample is off the map (the kernels' inf
    # fails the range test too), and the double-where keeps inf out of the gradient.
    finite = jnp.isfinite(offset)
    pos = corner[:, :, None] + exact_divide(jnp.where(finite, offset, 0), divisor[:, None, None])
    size = size[:, None, None]
    valid = finite & (i < count_f[:, None, None]) & (pos >= -1) & (pos <= size)
    pos = jnp.where(valid, pos, 0)  # the double-where: no inf/NaN in dead branches

    lo, hi, w_lo, w_hi = bilinear_taps(pos, size)
    scale_w = valid.astype(dtype)
    if normalize:
        scale_w = scale_w / divisor[:, None, None]
    count = jnp.minimum(count_f, bound).astype(jnp.int32)  # samples visited per bin
    return AxisTaps(lo, hi, w_lo * scale_w, w_hi * scale_w, valid, count, bound)


def bilinear_taps(pos, size):
    """RoIAlign's clamps of one coordinate of a valid sample: ``(lo, hi, w_lo, w_hi)``, the
    two neighbouring rows (or columns) and their weights (``pos <= 0`` reads row 0, a
    position at or past the last row reads it alone)."""
    pos = jnp.where(pos <= 0, jnp.zeros_like(pos), pos)
    lo = jnp.floor(pos).astype(jnp.int32)
    at_edge = lo >= size - 1
    lo = jnp.where(at_edge, size - 1, lo)
    hi = jnp.where(at_edge, size - 1, lo + 1)
    pos = jnp.where(at_edge, lo.astype(pos.dtype), pos)
    frac = pos - lo.astype(pos.dtype)
    return lo, hi, 1 - frac, frac


def window_index(need, choices):
    """Which of the static windows ``choices`` (smallest first) is the smallest holding
    ``need`` samples per bin side: the branch index of a ``lax.switch``."""
    return jnp.sum(need > jnp.asarray(choices[:-1], need.dtype)).astype(jnp.int32)


def interleave(taps: AxisTaps):
    """``[K, bins, 2G]`` tap lists: rows, weights and liveness, lo/hi of each sample side by side."""
    k, bins, g = taps.lo.shape

    def pair(a, b):
        return jnp.stack([a, b], axis=-1).reshape(k, bins, 2 * g)

    return pair(taps.lo, taps.hi), pair(taps.w_lo, taps.w_hi), pair(taps.valid, taps.valid)


def merge_taps(rows, weights, live_tap):
    """Merges taps that hit the same row, so a bin costs its distinct rows, not 2G taps.

    Returns ``(rows, weights, counts)`` with the distinct rows of each bin first (in
    increasing order), zero-weight padding after, and ``counts [K, bins]`` the number of
    distinct rows. Merging sums weights of equal rows: the same linear map, fewer gathers.
    ``live_tap`` marks taps that take part (a valid sample).
    """
    n = rows.shape[-1]
    same = (rows[..., :, None] == rows[..., None, :]) & live_tap[..., :, None] & live_tap[..., None, :]
    earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)  # [t, t'] : t' < t
    first = live_tap & ~jnp.any(same & earlier, axis=-1)
    below = (rows[..., None, :] < rows[..., :, None]) & first[..., None, :]
    slot = jnp.sum(below, axis=-1)  # distinct live rows below this tap's row
    onehot = (slot[..., :, None] == jnp.arange(n)) & live_tap[..., :, None]  # [.., t, j]
    merged_w = jnp.einsum("...tj,...t->...j", onehot.astype(weights.dtype), weights)
    merged_r = jnp.sum(jnp.where(onehot & first[..., :, None], rows[..., :, None], 0), axis=-2)
    counts = jnp.sum(first, axis=-1).astype(jnp.int32)
    return merged_r.astype(jnp.int32), merged_w, counts


def merge_runs(taps: AxisTaps, run: int = 5):
    """:func:`merge_taps` for adaptive sampling, without the pairwise comparison.

    Adaptive samples are more than half a pixel apart (``bin / ceil(bin) > 0.5`` when a bin
    has two or more), so along a bin's samples the row ``lo`` grows by 0 or 1 per sample,
    and at most four consecutive samples share one (two in ``[-1, 0]`` that clamp to row 0
    and two in ``(0, 1)``). Each distinct row gets one entry: the first sample with that
    ``lo``, plus one after the last sample for its ``hi`` row; the entry sums the weights
    of every tap on its row, all of which lie within ``run`` samples of it. That is a few
    shifted elementwise passes over the ``[K, bins, G]`` tables, not a scatter or a sort.
    Entries are in increasing row order with zero-weight gaps; ``counts`` is one past the
    last live entry. Returns ``(rows, weights, counts)`` as :func:`merge_taps`.
    """
    # Materialised first: fused into the shifted reads below, XLA would recompute the taps
    # once per shift (measured: 20x slower).
    lo, hi, w_lo, w_hi, valid = lax.optimization_barrier((taps.lo, taps.hi, taps.w_lo, taps.w_hi, taps.valid))
    width = ((0, 0), (0, 0), (run, run + 1))
    LO, HI = jnp.pad(lo, width, constant_values=-2), jnp.pad(hi, width, constant_values=-2)
    WLO, WHI = jnp.pad(w_lo, width), jnp.pad(w_hi, width)
    V = jnp.pad(valid, width)
    g = lo.shape[-1]

    def at(a, d):  # a[e + d] for the entries e in [0, g]
        return a[..., run + d:run + d + g + 1]

    v, v_prev = at(V, 0), at(V, -1)
    lo_e, lo_prev, hi_prev = at(LO, 0), at(LO, -1), at(HI, -1)
    row = jnp.where(v, lo_e, hi_prev)
    live = (v & (~v_prev | (lo_e != lo_prev))) | (~v & v_prev & (hi_prev != lo_prev))
    weight = 0
    for d in range(-run, run):
        vd = at(V, d)
        weight = weight + jnp.where(vd & (at(LO, d) == row), at(WLO, d), 0) + jnp.where(
            vd & (at(HI, d) == row), at(WHI, d), 0)
    weight = jnp.where(live, weight, 0)
    rows = jnp.where(live, row, 0).astype(jnp.int32)
    counts = jnp.max(jnp.where(live, jnp.arange(g + 1) + 1, 0), axis=-1).astype(jnp.int32)
    return rows, weight, counts
