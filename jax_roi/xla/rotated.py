r"""Rotated RoIAlign (detectron2's ``ROIAlignRotated``) in pure JAX.

A box ``(x_ctr, y_ctr, w, h, angle)`` (angle in degrees, counter-clockwise on the screen
as detectron2 draws it) is an ``oh x ow`` grid of bins in the box's own frame, rotated
about its centre. With ``off = 0.5 if aligned else 0``, the centre in feature pixels is
``(x_ctr*s - off, y_ctr*s - off)``, the size ``(w*s, h*s)`` (legacy: each at least 1), and
sample ``(iy, ix)`` of bin ``(ph, pw)`` sits at the box-frame point

.. math:: yy = -\tfrac{h}{2} + p_h b_h + (i_y + \tfrac12) \tfrac{b_h}{g_h},\qquad
          xx = -\tfrac{w}{2} + p_w b_w + (i_x + \tfrac12) \tfrac{b_w}{g_w}

which maps to ``y = yy cos(t) - xx sin(t) + c_y``, ``x = yy sin(t) + xx cos(t) + c_x`` and
is read bilinearly as in RoIAlign (zero outside ``[-1, H] x [-1, W]``); each bin averages
its ``g_h x g_w`` samples (``sampling_ratio``, or ``ceil(b)`` per side when adaptive).

Not separable: a sample's row depends on both of its indices. So every sample of every
output cell is evaluated (four gathers of one ``C``-vector each) and accumulated; loops
over the samples run to a static window, chosen per call as the smallest of a few that
holds the largest sample count present (a ``lax.switch``), so the cost follows the boxes.
A box far larger than the map has more samples per side than any window: only those that
can land on the map are visited (the map's extent in the box's frame bounds them), so any
box costs bounded time. Everything is plain differentiable JAX, the box's five numbers
included (a clamp is differentiated as the piecewise function it is).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jax_roi.xla.contraction import accumulation_dtype
from jax_roi.xla.sampling import bilinear_taps, exact_divide, live_boxes, window_index

# Sample pairs per bin up to which the loops are unrolled (fused into one pass by XLA).
_MAX_UNROLLED_SAMPLES = 16


def _full_window(height: int, width: int) -> int:
    """Samples per bin side that can reach the map when a side has more than that: the map
    ``[-1, W] x [-1, H]`` spans at most ``W + H + 2`` along any direction of the box's
    frame, adaptive samples are more than half a pixel apart, plus a sample of margin at
    each end for the rounding of the window's start."""
    return 2 * (height + width + 2) + 4


def _windows(full: int) -> tuple[int, ...]:
    return tuple(w for w in (4, 16) if w < full) + (full,)


def _geometry(rois, live, *, spatial_scale, output_size, sampling_ratio, aligned):
    """Per box ``[K]``: centre, cos/sin, bin sizes, sample counts (0 for a dead box) and the
    box-frame start of the bins, all in the coordinate dtype, and liveness (``live``, and
    False for a size that overflows). A dead box's numbers are zeroed before any
    arithmetic, so that no NaN reaches the gradient."""
    dtype = rois.dtype
    oh, ow = output_size
    num = rois.shape[0]
    scale = jnp.asarray(spatial_scale, dtype)
    rois = jnp.where(live[:, None], rois, 0)
    cx, cy, w, h = (rois[:, i] * scale for i in range(1, 5))
    # A size that overflows (beyond 1e38 in float32) has no finite sample: a dead box.
    live = live & jnp.isfinite(lax.stop_gradient(w * 0.5)) & jnp.isfinite(lax.stop_gradient(h * 0.5))
    cx, cy, w, h, angle = (jnp.where(live, v, 0) for v in (cx, cy, w, h, rois[:, 5]))
    offset = jnp.asarray(0.5 if aligned else 0.0, dtype)
    cx, cy = cx - offset, cy - offset
    if not aligned:  # legacy: a malformed box becomes one pixel wide (zero derivative below)
        w = jnp.where(w < 1, jnp.ones_like(w), w)
        h = jnp.where(h < 1, jnp.ones_like(h), h)
    theta = angle * jnp.asarray(math.pi / 180, dtype)
    bin_h, bin_w = exact_divide(h, oh), exact_divide(w, ow)

    def count(bin_size):
        if sampling_ratio > 0:
            c = jnp.full((num,), sampling_ratio, dtype)
        else:
            c = lax.stop_gradient(jnp.ceil(bin_size))
            c = jnp.where(jnp.isfinite(c) & (c > 0), c, 0)
        return jnp.where(live, c, 0)

    return dict(cx=cx, cy=cy, cos=jnp.cos(theta), sin=jnp.sin(theta), bin_h=bin_h, bin_w=bin_w,
                g_h=count(bin_h), g_w=count(bin_w), start_h=-h / 2, start_w=-w / 2), live


def _axis_samples(start, bin_size, count, bins, window, lo_hi):
    """``[K, bins, window]`` box-frame coordinates of the visited samples of one axis and
    whether each exists. ``lo_hi [K]`` x 2: the range of this axis's coordinate over the
    map's extent in the box frame; a bin with more samples than the window starts it one
    sample before the first that can reach that range (positions grow by ``bin / count``)."""
    dtype = start.dtype
    p = jnp.arange(bins, dtype=dtype)[None, :]
    corner = start[:, None] + p * bin_size[:, None]  # where each bin begins
    wide = (count > window)[:, None]
    step = lax.stop_gradient(jnp.where(wide[:, 0], bin_size, 1) / jnp.where(wide[:, 0], jnp.maximum(count, 1), 1))
    reach = lax.stop_gradient(jnp.where(step >= 0, lo_hi[0], lo_hi[1]))  # the first sample reaching the map
    guess = jnp.floor(lax.stop_gradient((reach[:, None] - corner) / step[:, None] - 0.5)) - 1
    first = jnp.where(wide, jnp.clip(guess, 0, (count - window)[:, None]), 0)
    first = jnp.where(jnp.isfinite(first), first, 0)
    i = first[:, :, None] + jnp.arange(window, dtype=dtype)[None, None, :]
    offset = (i + 0.5) * bin_size[:, None, None]
    finite = jnp.isfinite(offset)
    pos = corner[:, :, None] + exact_divide(jnp.where(finite, offset, 0), jnp.maximum(count, 1)[:, None, None])
    exists = finite & (i < count[:, None, None])
    return jnp.where(exists, pos, 0), exists


def _map_extent(geo, height, width):
    """The map's rectangle ``[-1, W] x [-1, H]`` in each box's frame: ``(yy_lo, yy_hi)``,
    ``(xx_lo, xx_hi)`` over its four corners (where a wide bin's window may start)."""
    ys, xs = [], []
    for y in (-1.0, float(height)):
        for x in (-1.0, float(width)):
            dy, dx = y - geo["cy"], x - geo["cx"]  # the inverse rotation of (dy, dx)
            ys.append(dy * geo["cos"] + dx * geo["sin"])
            xs.append(-dy * geo["sin"] + dx * geo["cos"])
    ys, xs = jnp.stack(ys), jnp.stack(xs)
    return (jnp.min(ys, 0), jnp.max(ys, 0)), (jnp.min(xs, 0), jnp.max(xs, 0))


def to_map(geo, yy, xx):
    """Box-frame points ``(yy, xx)`` (arrays ``[K, ...]`` of one rank) to feature coordinates
    ``(y, x)``: the rotation by each box's angle about its centre. (Also what the sampling
    picture, ``jax_roi.tools.figures``, draws.)"""
    def per_box(v):
        return v.reshape(v.shape + (1,) * (max(yy.ndim, xx.ndim) - 1))

    cos, sin = per_box(geo["cos"]), per_box(geo["sin"])
    return yy * cos - xx * sin + per_box(geo["cy"]), yy * sin + xx * cos + per_box(geo["cx"])


def _sample(flat, base, geo, yy, ey, xx, ex, height, width, acc, normalizer):
    """The weighted bilinear value ``[K, oh, ow, C]`` of one sample per output cell: ``yy,
    ey [K, oh]`` (box-frame row coordinate, exists), ``xx, ex [K, ow]``."""
    y, x = to_map(geo, yy[:, :, None], xx[:, None, :])
    valid = ey[:, :, None] & ex[:, None, :] & (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    y, x = jnp.where(valid, y, 0), jnp.where(valid, x, 0)  # the double-where: no NaN in dead branches
    y_lo, y_hi, wy_lo, wy_hi = bilinear_taps(y, height)
    x_lo, x_hi, wx_lo, wx_hi = bilinear_taps(x, width)
    scale = valid.astype(y.dtype) * normalizer
    value = 0
    for rows, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for cols, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            v = flat.at[base[:, None, None] + rows * width + cols].get(mode="promise_in_bounds")
            value = value + (wy * wx * scale).astype(acc)[..., None] * v.astype(acc)
    return value


def _align(flat, base, geo, extent, output_size, window_h, window_w, height, width, acc):
    oh, ow = output_size
    yy, ey = _axis_samples(geo["start_h"], geo["bin_h"], geo["g_h"], oh, window_h, extent[0])
    xx, ex = _axis_samples(geo["start_w"], geo["bin_w"], geo["g_w"], ow, window_w, extent[1])
    normalizer = (1 / jnp.maximum(geo["g_h"] * geo["g_w"], 1))[:, None, None]
    out = jnp.zeros((yy.shape[0], oh, ow, flat.shape[-1]), acc)

    def sample(iy, ix):
        y_i = lax.dynamic_index_in_dim(yy, iy, 2, keepdims=False)
        e_i = lax.dynamic_index_in_dim(ey, iy, 2, keepdims=False)
        x_i = lax.dynamic_index_in_dim(xx, ix, 2, keepdims=False)
        f_i = lax.dynamic_index_in_dim(ex, ix, 2, keepdims=False)
        return _sample(flat, base, geo, y_i, e_i, x_i, f_i, height, width, acc, normalizer)

    if window_h * window_w <= _MAX_UNROLLED_SAMPLES:
        for iy in range(window_h):
            for ix in range(window_w):
                out = out + sample(iy, ix)
        return out
    # Static trip counts: a scan, which reverse mode differentiates. Each sample is
    # recomputed in the backward (jax.checkpoint) rather than kept: reverse mode would
    # otherwise store every iteration's taps and values, each as large as the output (the
    # 16 x 16 window on box-head's 1024 boxes of 256 channels asked for 99.5 GB).
    sample = jax.checkpoint(sample)
    return lax.fori_loop(0, window_h, lambda iy, out: lax.fori_loop(
        0, window_w, lambda ix, out: out + sample(iy, ix), out), out)


def roi_align_rotated(features, rois, output_size, *, spatial_scale=1.0, sampling_ratio=-1, aligned=True):
    """Canonical form: ``features [B, H, W, C]``, ``rois [K, 6]`` ``(batch, x_ctr, y_ctr, w,
    h, angle)``. Returns ``[K, oh, ow, C]`` in the features' dtype."""
    num_images, height, width, channels = features.shape
    k = rois.shape[0]
    if height == 0 or width == 0 or k == 0:
        return jnp.zeros((k,) + tuple(output_size) + (channels,), features.dtype)
    acc = accumulation_dtype(features.dtype)
    batch, live = live_boxes(rois, num_images)
    geo, live = _geometry(rois, live, spatial_scale=spatial_scale, output_size=output_size,
                          sampling_ratio=sampling_ratio, aligned=aligned)
    extent = _map_extent(geo, height, width)
    flat = features.reshape(num_images * height * width, channels)
    base = batch * (height * width)

    def run(window_h, window_w):
        return lambda: _align(flat, base, geo, extent, output_size, window_h, window_w, height, width, acc)

    if sampling_ratio > 0:
        out = run(sampling_ratio, sampling_ratio)()
    else:
        full = _full_window(height, width)
        choices = _windows(full)
        need = jnp.maximum(jnp.max(geo["g_h"], initial=0), jnp.max(geo["g_w"], initial=0))
        out = lax.switch(window_index(need, choices), [run(w, w) for w in choices])
    return out.astype(features.dtype)
