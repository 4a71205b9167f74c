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
    division, under ``vmap`` too."""
    return numerator / _unfused(numerator * 0 + denominator)


def live_boxes(rois, num_images):
    """Batch indices (truncated like torchvision's ``int()``) and which boxes are live: all
    coordinates finite and the batch index inside ``[0, B)``. Dead boxes read index 0."""
    finite = jnp.all(jnp.isfinite(rois), axis=1)
    batch = jnp.trunc(jnp.clip(jnp.where(finite, rois[:, 0], -1), -1, num_images)).astype(jnp.int32)
    live = finite & (batch >= 0) & (batch < num_images)
    return jnp.where(live, batch, 0), live


def adaptive_cap(size: int, bins: int) -> int:
    """The cap on the adaptive sample count, ``ceil(size / bins)`` (docs/semantics.md)."""
    return max(1, -(-size // bins))


def sample_bound(sampling_ratio: int, size: int, bins: int) -> int:
    return sampling_ratio if sampling_ratio > 0 else adaptive_cap(size, bins)


def axis_taps(c1, c2, *, live, spatial_scale, bins: int, size, bound: int, sampling_ratio: int,
              aligned: bool, quantize: bool, normalize: bool) -> AxisTaps:
    """Sample taps of one axis for ``K`` boxes spanning ``[c1, c2]`` in image pixels.

    ``size`` and ``spatial_scale`` are scalars, or ``[K]`` arrays when the boxes sit on
    maps of different sizes (the levels of a feature pyramid); ``bound`` is the static
    bound of the per-bin sample count (:func:`sample_bound` over those maps).

    ``live`` ([K] bool) is False for a box that must give zeros and no gradient (a
    non-finite coordinate or a batch index outside the batch); its coordinates are
    replaced by 0 before any arithmetic so that no NaN reaches the gradient.
    ``normalize`` folds the average's ``1 / g`` into the weights.
    """
    dtype = c1.dtype
    c1 = jnp.where(live, c1, 0)
    c2 = jnp.where(live, c2, 0)
    scale = jnp.asarray(spatial_scale, dtype)
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

    size = jnp.broadcast_to(jnp.asarray(size, jnp.int32), c1.shape)
    if sampling_ratio > 0:
        count = jnp.full(c1.shape, sampling_ratio, jnp.int32)
    else:
        # ceil in float, capped before the cast so that an absurd box cannot overflow.
        count = jnp.minimum(jnp.ceil(bin_size), (size + bins - 1) // bins)
        count = jnp.where(jnp.isfinite(count), count, 0).astype(jnp.int32)
    count = jnp.where(live, count, 0)
    count_f = jnp.maximum(count, 1).astype(dtype)

    p = jnp.arange(bins, dtype=dtype)[None, :, None]
    i = jnp.arange(bound, dtype=dtype)[None, None, :]
    # Same association as torchvision: (start + p*bin) + ((i + 0.5) * bin) / g.
    pos = (start[:, None, None] + _unfused(p * bin_size[:, None, None])) + exact_divide(
        (i + 0.5) * bin_size[:, None, None], count_f[:, None, None])
    size = size[:, None, None]
    valid = (jnp.arange(bound)[None, None, :] < count[:, None, None]) & (pos >= -1) & (pos <= size)
    pos = jnp.where(valid, pos, 0)  # the double-where: no inf/NaN in dead branches

    pos = jnp.where(pos <= 0, jnp.zeros_like(pos), pos)
    lo = jnp.floor(pos).astype(jnp.int32)
    at_edge = lo >= size - 1
    lo = jnp.where(at_edge, size - 1, lo)
    hi = jnp.where(at_edge, size - 1, lo + 1)
    pos = jnp.where(at_edge, lo.astype(dtype), pos)
    frac = pos - lo.astype(dtype)
    w_hi = frac
    w_lo = 1 - frac
    scale_w = valid.astype(dtype)
    if normalize:
        scale_w = scale_w / count_f[:, None, None]
    return AxisTaps(lo, hi, w_lo * scale_w, w_hi * scale_w, valid, count, bound)


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
