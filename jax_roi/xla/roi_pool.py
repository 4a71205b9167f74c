"""RoIPool (Fast R-CNN: quantized bins, max over whole cells) in pure JAX.

Canonical inputs (``features [B, H, W, C]``, ``rois [K, 5]``). A bin is a rectangle of
whole cells, so its maximum is a range maximum: a two-dimensional sparse table holds, for
every cell and every pair of power-of-two block sides ``(2**i, 2**j)``, the maximum of the
block starting there and its first maximal cell in row-major order; a bin of ``h x w``
cells is the union of four such blocks (the smallest sides ``2**i >= h / 2`` and
``2**j >= w / 2``, one at each corner), so each output reads four table entries whatever
the bin's size. The first maximal cell is kept as a small key (``int8``) relative to the
block's corner. The table holds only the levels per axis that the largest bin present
needs (a ``lax.switch`` over pairs of level counts, so the cost and memory follow the
boxes), at most ``_LEVELS`` per axis; larger bins loop over blocks of that table. No
gradient flows through the search. The forward returns the maxima themselves; the first maximal cell is searched only
when differentiating (a ``custom_jvp``), and the tangent is the feature tangent read at
that cell, so reverse mode routes the gradient to it alone. That search runs a few
channels at a time under ``jax.checkpoint``, so the backward pass searches again step by
step and no winner index as large as the output is kept. Box coordinates only pass
through rounding, so boxes get no gradient (docs/semantics.md).

Ties: the first maximal cell of a union of blocks is the smallest row-major index among
the blocks' own first maximal cells whose value is the maximum (that cell lies in some
block, where nothing before it is maximal). NaN cells never win and a bin whose cells are
all ``-inf`` or NaN is 0, as with a strict ``>`` scan from ``-inf``.
"""

from __future__ import annotations

import jax
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


def _floor_log2(n):
    """``floor(log2(n))`` of positive int32 ``n`` (0 for ``n <= 0``)."""
    return jnp.where(n > 0, 31 - lax.clz(jnp.maximum(n, 1)), 0)


def _block_level(n):
    """The level ``i`` of the blocks that cover a bin side of ``n`` cells two at a time:
    the smallest ``2**i`` with ``2**(i + 1) >= n`` (0 for ``n <= 2``). A side of 4 takes
    two blocks of 2 rather than one of 4, so the table needs one level fewer there."""
    return _floor_log2(n - 1)


def _levels_needed(n):
    """Table levels (block sides 1, 2, 4, ...) that bin sides up to ``n`` cells need."""
    return max(1, (n - 1).bit_length())


def _shift(x, s, axis, fill):
    """``x`` moved ``s`` places towards index 0 along ``axis``; the vacated end is ``fill``."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, s)
    return lax.slice_in_dim(jnp.pad(x, pad, constant_values=fill), s, s + x.shape[axis], axis=axis)


def _key_dtype(levels_y, levels_x):
    """The narrowest integer for the cell keys of blocks up to ``2**(levels - 1)`` a side."""
    return jnp.int8 if (1 << (levels_y + levels_x - 2)) <= 127 else jnp.int32


def _table(values, levels_y, levels_x):
    """Sparse tables ``[levels_y, levels_x, B, H, W, C]``: the maximum of the block of
    ``2**i x 2**j`` cells from each cell and its first maximal cell (row-major) as the key
    ``dy * 2**(levels_x - 1) + dx`` from the block's corner (row-major order of keys is
    that of the cells)."""
    neg = jnp.array(-jnp.inf, values.dtype)
    kt = _key_dtype(levels_y, levels_x)
    kw = 1 << (levels_x - 1)
    row_v, row_a = [values], [jnp.zeros(values.shape, kt)]
    for j in range(1, levels_x):  # across columns: the right half can hold an earlier row
        s = 1 << (j - 1)
        v1, a1 = row_v[-1], row_a[-1]
        v2, a2 = _shift(v1, s, 2, neg), _shift(a1, s, 2, 0) + jnp.array(s, kt)
        v, a = lax.optimization_barrier(  # materialized: fused, every use would recompute it
            (jnp.maximum(v1, v2), jnp.where(v2 > v1, a2, jnp.where(v1 > v2, a1, jnp.minimum(a1, a2)))))
        row_v.append(v)
        row_a.append(a)
    tv, ta = [], []
    for v, a in zip(row_v, row_a):
        col_v, col_a = [v], [a]
        for i in range(1, levels_y):  # down rows: the lower half comes after in row-major
            s = 1 << (i - 1)
            v1, a1 = col_v[-1], col_a[-1]
            v2, a2 = _shift(v1, s, 1, neg), _shift(a1, s, 1, 0) + jnp.array(s * kw, kt)
            v, a = lax.optimization_barrier((jnp.maximum(v1, v2), jnp.where(v2 > v1, a2, a1)))
            col_v.append(v)
            col_a.append(a)
        tv.append(jnp.stack(col_v, 0))
        ta.append(jnp.stack(col_a, 0))
    return jnp.stack(tv, 1), jnp.stack(ta, 1)  # [levels_y, levels_x, B, H, W, C]


def _tables(values, levels_y, levels_x):
    """The sparse tables flattened to rows ``[levels_y * levels_x * B * H * W, C]``."""
    channels = values.shape[-1]
    tv, ta = _table(values, levels_y, levels_x)
    return tv.reshape(-1, channels), ta.reshape(-1, channels), levels_x


def _read(table, level, y, x, exists, shape, with_arg=True):
    """Table entries ``[K, oh, ow, C]`` of the blocks at level ``[K, oh, ow]`` from
    ``y [K, oh]``, ``x [K, ow]`` (row 0 where the bin is empty): values and (``with_arg``)
    the row-major index in the image of the first maximal cell."""
    (tv, ta, levels_x), (_, height, width) = table, shape
    y = jnp.clip(y, 0, height - 1)[:, :, None]
    x = jnp.clip(x, 0, width - 1)[:, None, :]
    row = jnp.where(exists, (level * height + y) * width + x, 0)
    if not with_arg:
        return tv.at[row].get(mode="promise_in_bounds"), None
    key = ta.at[row].get(mode="promise_in_bounds").astype(jnp.int32)
    bits = levels_x - 1  # key = dy * 2**bits + dx
    cell = (y[..., None] + (key >> bits)) * width + x[..., None] + (key & ((1 << bits) - 1))
    return tv.at[row].get(mode="promise_in_bounds"), cell


def _winner(values, batch, y0, hy, x0, hx, levels_y, levels_x, with_arg):
    """``[K, oh, ow, C]`` maximum of each bin (``-inf`` where the bin is empty) and, with
    ``with_arg``, the row-major index (in its image) of its first maximal cell, ``-1`` where
    the bin is empty or holds no cell above ``-inf``; every bin side at most ``2**levels``:
    four blocks, one pass."""
    num_images, height, width, _ = values.shape
    table = _tables(values, levels_y, levels_x)
    iy, jx = _block_level(hy), _block_level(hx)  # [K, oh], [K, ow]
    level = (iy[:, :, None] * levels_x + jx[:, None, :]) * num_images + batch[:, None, None]
    exists = (hy > 0)[:, :, None] & (hx > 0)[:, None, :]
    best, corners = None, []
    for y in (y0, y0 + hy - (1 << iy)):
        for x in (x0, x0 + hx - (1 << jx)):
            v, a = _read(table, level, y, x, exists, (num_images, height, width), with_arg)
            corners.append((v, a))
            best = v if best is None else jnp.maximum(best, v)
    best = jnp.where(exists[..., None], best, -jnp.inf)
    if not with_arg:
        return best, None
    big = jnp.iinfo(jnp.int32).max
    arg = None
    for v, a in corners:
        a = jnp.where(v == best, a, big)
        arg = a if arg is None else jnp.minimum(arg, a)
    return best, jnp.where(best > -jnp.inf, arg, -1)


def _winner_blocks(values, batch, y0, hy, x0, hx, levels_y, levels_x, with_arg):
    """As :func:`_winner` for bins of any size: a bin side ``h`` is covered by
    ``ceil(h / s)`` blocks of side ``s = 2**min(i, levels - 1)``, ``i`` as above (the last one
    flush with the bin's end), visited by loops that run to the largest bin present."""
    num_images, height, width, channels = values.shape
    table = _tables(values, levels_y, levels_x)
    iy = jnp.minimum(_block_level(hy), levels_y - 1)
    jx = jnp.minimum(_block_level(hx), levels_x - 1)
    ny, nx = (hy + (1 << iy) - 1) >> iy, (hx + (1 << jx) - 1) >> jx  # blocks per side
    level = (iy[:, :, None] * levels_x + jx[:, None, :]) * num_images + batch[:, None, None]
    big = jnp.iinfo(jnp.int32).max
    k, oh, ow = level.shape
    best = jnp.full((k, oh, ow, channels), -jnp.inf, values.dtype)
    arg = jnp.full((k, oh, ow, channels), big, jnp.int32) if with_arg else None

    def over_y(ty, carry):
        y = jnp.minimum(y0 + ty * (1 << iy), y0 + hy - (1 << iy))

        def over_x(tx, carry):
            best, arg = carry
            x = jnp.minimum(x0 + tx * (1 << jx), x0 + hx - (1 << jx))
            exists = (ty < ny)[:, :, None] & (tx < nx)[:, None, :]
            v, a = _read(table, level, y, x, exists, (num_images, height, width), with_arg)
            if not with_arg:
                return jnp.where(exists[..., None], jnp.maximum(best, v), best), None
            better = exists[..., None] & ((v > best) | ((v == best) & (a < arg)))
            return jnp.where(better, v, best), jnp.where(better, a, arg)

        return lax.fori_loop(0, jnp.max(nx, initial=0), over_x, carry)

    best, arg = lax.fori_loop(0, jnp.max(ny, initial=0), over_y, (best, arg))
    return best, (jnp.where(best > -jnp.inf, arg, -1) if with_arg else None)


# Table levels of the one-pass path: blocks up to 4 x 4 cells, bins up to 8 x 8 (box and
# mask heads); larger bins loop over blocks of the same table. Memory: at most 9 copies of
# the features (in the accumulation dtype) and 9 of their shape in int8 keys; box-head's
# bins (up to 4 x 5 cells) need 2 x 3 levels, mask-head's (3 x 3) 2 x 2.
_LEVELS = 3


# Channels searched per pass: the table of one chunk of channels stays in cache, where the
# whole map's (9 copies of it) would be written to and read back from memory (measured on
# box-head, 2 cores: forward 80-90 ms in one pass, 53-59 ms in chunks of 16 to 64).
_CHANNEL_CHUNK = 32


def _cell_dtype(height, width):
    """The narrowest type for a cell index in an image of ``height x width`` cells, with its
    all-ones pattern (``-1`` as int32, the maximum as uint16) left for "no cell": a narrow
    index is cheaper to write and to read back when routing the derivative."""
    return jnp.uint16 if height * width < jnp.iinfo(jnp.uint16).max else jnp.int32


def _no_cell(dtype):
    return jnp.array(jnp.iinfo(dtype).max if dtype == jnp.uint16 else -1, dtype)


def _narrow(arg, dtype):
    """``arg`` (int32, ``-1`` for no cell) as ``dtype`` with its "no cell" value."""
    return jnp.where(arg >= 0, arg.astype(dtype), _no_cell(dtype))


def _search(values, batch, y0, hy, x0, hx):
    """Each bin's maximum, ``[K, oh, ow, C]``, over chunks of :data:`_CHANNEL_CHUNK`
    channels (the last padded with ``-inf``)."""
    channels = values.shape[-1]
    if channels <= _CHANNEL_CHUNK:
        return _search_chunk(values, batch, y0, hy, x0, hx, with_arg=False)[0]
    chunks = -(-channels // _CHANNEL_CHUNK)
    padded = chunks * _CHANNEL_CHUNK
    if padded != channels:
        values = jnp.pad(values, ((0, 0),) * 3 + ((0, padded - channels),), constant_values=-jnp.inf)
    k, (oh, ow) = batch.shape[0], (y0.shape[1], x0.shape[1])

    def chunk(i, best):
        part = lax.dynamic_slice_in_dim(values, i * _CHANNEL_CHUNK, _CHANNEL_CHUNK, axis=3)
        found, _ = _search_chunk(part, batch, y0, hy, x0, hx, with_arg=False)
        return lax.dynamic_update_slice_in_dim(best, found, i * _CHANNEL_CHUNK, axis=3)

    best = lax.fori_loop(0, chunks, chunk, jnp.zeros((k, oh, ow, padded), values.dtype))
    return best[..., :channels]


def _search_chunk(values, batch, y0, hy, x0, hx, with_arg):
    """:func:`_search` of a few channels, on the sparse table with the fewest levels that
    the largest bin present needs."""
    _, height, width, _ = values.shape
    max_y, max_x = _levels_needed(height), _levels_needed(width)  # levels a bin can need
    need_y = _block_level(jnp.max(hy, initial=0)) + 1
    need_x = _block_level(jnp.max(hx, initial=0)) + 1
    # One branch per pair of level counts, the two axes at most one level apart (a box
    # head's bins are often one level wider than tall), and for each pair of needs the
    # branch of the smallest table that fits them, both chosen here once.
    pairs = sorted({(min(a, max_y), min(b, max_x))
                    for a in range(1, _LEVELS + 1) for b in range(1, _LEVELS + 1) if abs(a - b) <= 1})
    branches = [(lambda ly, lx: lambda *a: _winner(*a, ly, lx, with_arg))(ly, lx) for ly, lx in pairs]
    smallest_fit = [[min((i for i, (ly, lx) in enumerate(pairs) if ly >= a and lx >= b),
                         key=lambda i: pairs[i][0] * pairs[i][1])
                     for b in range(1, min(max_x, _LEVELS) + 1)] for a in range(1, min(max_y, _LEVELS) + 1)]
    index = jnp.asarray(smallest_fit)[jnp.minimum(need_y, len(smallest_fit)) - 1,
                                      jnp.minimum(need_x, len(smallest_fit[0])) - 1]
    if max(max_y, max_x) > _LEVELS:  # some bin side may need more levels than the table has
        branches.append(lambda *a: _winner_blocks(*a, min(_LEVELS, max_y), min(_LEVELS, max_x), with_arg))
        index = jnp.where((need_y > _LEVELS) | (need_x > _LEVELS), len(branches) - 1, index)
    best, arg = lax.switch(index, branches, values, batch, y0, hy, x0, hx)
    return best, (None if arg is None else _narrow(arg, _cell_dtype(height, width)))


def _search_values(features):
    """What the search compares: the features in the accumulation dtype, NaN as ``-inf``
    (a NaN cell never wins), with no gradient."""
    values = lax.stop_gradient(features).astype(accumulation_dtype(features.dtype))
    return jnp.where(jnp.isnan(values), -jnp.inf, values)


@jax.custom_jvp
def _bin_max(features, batch, y0, hy, x0, hx):
    """``[K, oh, ow, C]``: each bin's maximum cell value, 0 for a bin without cells above
    ``-inf``. The forward needs only the maxima; the first maximal cell, which routes the
    derivative, is searched only when differentiating (the rule below)."""
    best = _search(_search_values(features), batch, y0, hy, x0, hx)
    return jnp.where(best > -jnp.inf, best, 0).astype(features.dtype)


def _at_winner(x, batch, arg):
    """``x [B, H, W, C]`` read at each bin's first maximal cell (``arg``), 0 where none."""
    _, height, width, channels = x.shape
    has = arg != _no_cell(arg.dtype)
    arg = arg.astype(jnp.int32)
    base = (batch * (height * width))[:, None, None, None]
    idx = (base + jnp.where(has, arg, 0)) * channels + jnp.arange(channels)
    value = x.reshape(-1).at[idx].get(mode="promise_in_bounds")
    return jnp.where(has, value, jnp.zeros_like(value))


# Channels per step of the search that routes the derivative. That search runs again in the
# backward pass (below), one step at a time, so its table, winner index and scatter stay
# small: on box-head the whole forward + backward holds 30 MB of temporaries in steps of
# 16 channels, against 150 MB with the winner index kept for every channel. Above 32 MB
# glibc maps the block afresh on every call, and faulting its pages in cost more than the
# search itself (35,000 page faults per call).
_ROUTING_CHUNK = 16


def _routed_tangent(features, tangent, batch, y0, hy, x0, hx):
    """``[K, oh, ow, C]``: ``tangent`` read at each bin's first maximal cell (0 where none),
    linear in ``tangent``. The first maximal cell is searched here, in steps of
    :data:`_ROUTING_CHUNK` channels under ``jax.checkpoint``, so that reverse mode searches
    again step by step and scatters each step's cotangent, never holding a winner index
    the size of the output."""
    values = _search_values(features)
    num_images, height, width, channels = values.shape
    chunk = min(channels, _ROUTING_CHUNK)
    steps = -(-channels // chunk)
    pad = steps * chunk - channels
    if pad:
        values = jnp.pad(values, ((0, 0),) * 3 + ((0, pad),), constant_values=-jnp.inf)
        tangent = jnp.pad(tangent, ((0, 0),) * 3 + ((0, pad),))
    # The tangent as the scan's steps (its transpose stacks the cotangent the same way);
    # the values, which carry no derivative, are sliced in place.
    tangent = jnp.moveaxis(tangent.reshape(num_images, height, width, steps, chunk), 3, 0)

    @jax.checkpoint
    def step(i, part):
        v = lax.dynamic_slice_in_dim(values, i * chunk, chunk, axis=3)
        _, arg = _search_chunk(v, batch, y0, hy, x0, hx, with_arg=True)
        return i + 1, _at_winner(part, batch, arg)

    _, out = lax.scan(step, 0, tangent)  # [steps, K, oh, ow, chunk]
    k, oh, ow = out.shape[1:4]
    return jnp.moveaxis(out, 0, 3).reshape(k, oh, ow, steps * chunk)[..., :channels]


@_bin_max.defjvp
def _bin_max_jvp(primals, tangents):
    # The primal is the forward itself (the maxima need no winner). The tangent is the
    # feature tangent at the first maximal cell: a gather, linear in it, which reverse
    # mode transposes into a scatter-add onto that cell alone. Its second derivative in
    # the features is 0 (the search carries no gradient), as for any max.
    return _bin_max(*primals), _routed_tangent(primals[0], tangents[0], *primals[1:])


def roi_pool(features, rois, output_size, *, spatial_scale=1.0, binning="caffe"):
    """Canonical-form RoIPool. Returns ``[K, oh, ow, C]``."""
    num_images, height, width, channels = features.shape
    oh, ow = output_size
    if height == 0 or width == 0:  # no cells: every bin is empty
        return jnp.zeros((rois.shape[0], oh, ow, channels), features.dtype)
    batch, live = live_boxes(rois, num_images)
    common = dict(live=live, spatial_scale=spatial_scale, binning=binning)
    y0, hy = _axis_bins(rois[:, 2], rois[:, 4], bins=oh, size=height, **common)
    x0, hx = _axis_bins(rois[:, 1], rois[:, 3], bins=ow, size=width, **common)
    return _bin_max(features, batch, y0, hy, x0, hx)
