"""The sampling picture: where RoIPool, RoIWarp, RoIAlign and rotated RoIAlign read a feature map.

:func:`sampling_geometry` computes, for one box, the region each op uses, its bins and its
sampling points, with the formulas of ``docs/semantics.md`` written out, and then checks them
against the library itself (:func:`check_geometry`: the ops run on ramp maps whose values are
their own coordinates, so they report where they sampled). :func:`draw_sampling_picture` draws
them side by side (matplotlib, imported when called, rendered with Agg). Rotated RoIAlign's
bins and samples (:func:`rotated_sampling_geometry`) are not written out again: they come
from the library's own geometry (``jax_roi.xla.rotated``), and are checked the same way.

Coordinates in the picture: feature cell ``(i, j)`` is the unit square ``[j, j+1) x [i, i+1)``
and its value sits at its centre ``(j + 0.5, i + 0.5)``. The ops index features by cell
(``f[y0, x0]`` at coordinate ``y0``), so a sampling coordinate ``x`` of docs/semantics.md is drawn
at ``x + 0.5``; with ``aligned=True`` that puts RoIAlign's grid exactly on the box.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["check_geometry", "draw_sampling_picture", "rotated_sampling_geometry", "sampling_geometry"]

METHODS = ("roi_pool", "roi_warp", "roi_align")
ROTATED = "roi_align_rotated"

# Default scene: an 8x8 feature map (stride 1 for simplicity) and a box that does not sit on
# the cell grid, so the quantization of RoIPool / RoIWarp shows.
DEFAULT_BOX = (1.6, 1.3, 6.3, 5.9)
DEFAULT_MAP = (8, 8)
# An oriented box (x_ctr, y_ctr, w, h, angle in degrees, counter-clockwise as drawn).
DEFAULT_ROTATED_BOX = (4.0, 3.7, 5.2, 3.0, 30.0)


def _round_half_away(v: float) -> int:
    return int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def sampling_geometry(method: str, box: Sequence[float] = DEFAULT_BOX, output_size: Any = 2, *,
                      map_size: Sequence[int] = DEFAULT_MAP, spatial_scale: float = 1.0,
                      sampling_ratio: int = 2, aligned: bool = True, binning: str = "caffe") -> dict:
    """Where ``method`` reads the map for ``box`` (image pixels), in picture coordinates.

    Returns a dict with
      ``box``: the box in feature pixels ``(x1, y1, x2, y2)`` (``* spatial_scale``);
      ``region``: the rectangle the op actually covers;
      ``bins``: ``[oh, ow, 4]`` bin rectangles ``(x0, y0, x1, y1)``;
      for ``roi_pool``: ``cells`` ``[oh, ow, 4]`` integer ``(w0, h0, w1, h1)``, half-open, clipped;
      for ``roi_warp`` / ``roi_align``: ``samples`` ``[oh, ow, gy, gx, 2]`` ``(x, y)`` points, and
      ``grid`` ``(gy, gx)``;
      and the arguments.
    """
    H, W = (int(map_size[0]), int(map_size[1]))
    oh, ow = _pair(output_size)
    s = float(spatial_scale)
    x1, y1, x2, y2 = (float(v) * s for v in box)
    geo = dict(method=method, box=(x1, y1, x2, y2), output_size=(oh, ow), map_size=(H, W),
               spatial_scale=s, sampling_ratio=sampling_ratio, aligned=aligned, binning=binning)
    if method == "roi_pool":
        if binning == "caffe":
            # sx = round(x1*s); ex = round(x2*s); rw = max(ex - sx + 1, 1); bw = rw / ow
            # bin pw covers [floor(pw*bw) + sx, ceil((pw+1)*bw) + sx), clipped to [0, W]
            sx, sy, ex, ey = (_round_half_away(v) for v in (x1, y1, x2, y2))
            rw, rh = max(ex - sx + 1, 1), max(ey - sy + 1, 1)
            bw, bh = rw / ow, rh / oh
            cols = [(math.floor(p * bw) + sx, math.ceil((p + 1) * bw) + sx) for p in range(ow)]
            rows = [(math.floor(p * bh) + sy, math.ceil((p + 1) * bh) + sy) for p in range(oh)]
            region = (sx, sy, sx + rw, sy + rh)
        elif binning == "floor":
            # sx = floor(x1*s); ex = floor(x2*s) (exclusive); q = floor((ex - sx) / ow);
            # bins of q cells, the last one takes the rest
            sx, sy, ex, ey = (math.floor(v) for v in (x1, y1, x2, y2))
            qx, qy = (ex - sx) // ow, (ey - sy) // oh
            cols = [(sx + p * qx, sx + (p + 1) * qx if p < ow - 1 else ex) for p in range(ow)]
            rows = [(sy + p * qy, sy + (p + 1) * qy if p < oh - 1 else ey) for p in range(oh)]
            region = (sx, sy, ex, ey)
        else:
            raise ValueError(f"binning: expected 'caffe' or 'floor', got {binning!r}")

        def clip(a, b, n):
            return min(max(a, 0), n), min(max(b, 0), n)

        cells = np.zeros((oh, ow, 4), int)  # (w0, h0, w1, h1), clipped
        for ph in range(oh):
            for pw in range(ow):
                (w0, w1), (h0, h1) = clip(*cols[pw], W), clip(*rows[ph], H)
                cells[ph, pw] = (w0, h0, w1, h1)
        bins = np.array([[(cols[pw][0], rows[ph][0], cols[pw][1], rows[ph][1]) for pw in range(ow)]
                         for ph in range(oh)], dtype=float)
        geo.update(region=region, bins=bins, cells=cells)
        return geo
    if method not in ("roi_warp", "roi_align"):
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "roi_warp":
        # RoIWarp: the legacy grid (aligned=False) on the box rounded to whole cells
        x1, y1, x2, y2 = (float(_round_half_away(v)) for v in (x1, y1, x2, y2))
        aligned = False
    off = 0.5 if aligned else 0.0
    # sx = x1*s - off; rw = x2*s - off - sx (legacy: at least 1); bw = rw / ow
    sx, sy = x1 - off, y1 - off
    rw, rh = (x2 - off) - sx, (y2 - off) - sy
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    bw, bh = rw / ow, rh / oh
    # gx = sampling_ratio, or adaptive ceil(rw / ow) capped at ceil(W / ow)
    gx = sampling_ratio if sampling_ratio > 0 else min(math.ceil(rw / ow), math.ceil(W / ow))
    gy = sampling_ratio if sampling_ratio > 0 else min(math.ceil(rh / oh), math.ceil(H / oh))
    # x = sx + pw*bw + (ix + 0.5) * bw / gx, drawn at x + 0.5
    xs = np.array([[sx + pw * bw + (ix + 0.5) * bw / gx for ix in range(gx)] for pw in range(ow)])
    ys = np.array([[sy + ph * bh + (iy + 0.5) * bh / gy for iy in range(gy)] for ph in range(oh)])
    samples = np.zeros((oh, ow, gy, gx, 2))
    samples[..., 0] = xs[None, :, None, :] + 0.5
    samples[..., 1] = ys[:, None, :, None] + 0.5
    bins = np.array([[(sx + pw * bw + 0.5, sy + ph * bh + 0.5, sx + (pw + 1) * bw + 0.5, sy + (ph + 1) * bh + 0.5)
                      for pw in range(ow)] for ph in range(oh)])
    geo.update(region=(sx + 0.5, sy + 0.5, sx + rw + 0.5, sy + rh + 0.5), bins=bins, samples=samples,
               grid=(gy, gx), aligned=aligned)
    return geo


def rotated_sampling_geometry(box: Sequence[float] = DEFAULT_ROTATED_BOX, output_size: Any = 2, *,
                              map_size: Sequence[int] = DEFAULT_MAP, spatial_scale: float = 1.0,
                              sampling_ratio: int = 2, aligned: bool = True) -> dict:
    """Where rotated RoIAlign reads the map for the oriented ``box`` ``(x_ctr, y_ctr, w, h,
    angle)`` (image pixels, degrees), in picture coordinates, from the library's own
    geometry (``jax_roi.xla.rotated``: the box's frame, its bins and sample counts, and the
    rotation to the map).

    Returns a dict with ``corners`` ``[4, 2]`` (the sampled box, ``(x, y)``), ``bins``
    ``[oh, ow, 4, 2]`` (each bin's corners, in order), ``samples`` ``[oh, ow, gy, gx, 2]``,
    ``grid`` ``(gy, gx)``, ``method`` and the arguments.
    """
    import jax.numpy as jnp

    from jax_roi.xla import rotated

    H, W = (int(map_size[0]), int(map_size[1]))
    oh, ow = _pair(output_size)
    rois = jnp.asarray([[0.0, *(float(v) for v in box)]], jnp.float32)
    geo, _ = rotated._geometry(rois, jnp.ones((1,), bool), spatial_scale=float(spatial_scale),
                               output_size=(oh, ow), sampling_ratio=sampling_ratio, aligned=aligned)
    gy, gx = int(geo["g_h"][0]), int(geo["g_w"][0])
    extent = rotated._map_extent(geo, H, W)
    # every sample of every bin: a window as wide as the count
    yy, _ = rotated._axis_samples(geo["start_h"], geo["bin_h"], geo["g_h"], oh, max(gy, 1), extent[0])
    xx, _ = rotated._axis_samples(geo["start_w"], geo["bin_w"], geo["g_w"], ow, max(gx, 1), extent[1])
    y, x = rotated.to_map(geo, yy[:, :, None, :, None], xx[:, None, :, None, :])  # [1, oh, ow, gy, gx]
    samples = np.stack([np.asarray(x[0]), np.asarray(y[0])], -1)[:, :, :gy, :gx] + 0.5
    # bin edges in the box frame, through the same rotation
    edge_y = np.asarray(geo["start_h"])[:, None] + np.arange(oh + 1)[None, :] * np.asarray(geo["bin_h"])[:, None]
    edge_x = np.asarray(geo["start_w"])[:, None] + np.arange(ow + 1)[None, :] * np.asarray(geo["bin_w"])[:, None]
    ey, ex = rotated.to_map(geo, jnp.asarray(edge_y)[:, :, None], jnp.asarray(edge_x)[:, None, :])
    grid = np.stack([np.asarray(ex[0]), np.asarray(ey[0])], -1) + 0.5  # [oh + 1, ow + 1, (x, y)]
    bins = np.stack([grid[:-1, :-1], grid[:-1, 1:], grid[1:, 1:], grid[1:, :-1]], 2)
    corners = np.stack([grid[0, 0], grid[0, -1], grid[-1, -1], grid[-1, 0]])
    return dict(method=ROTATED, box=tuple(float(v) for v in box), output_size=(oh, ow), map_size=(H, W),
                spatial_scale=float(spatial_scale), sampling_ratio=sampling_ratio, aligned=aligned,
                corners=corners, bins=bins, samples=samples, grid=(gy, gx))


def bilinear_neighbours(x: float, y: float, map_size: Sequence[int]):
    """The cells a sample at picture point ``(x, y)`` reads and their weights, as docs/semantics.md's
    bilinear rule: ``[((row, col), weight), ...]`` (empty outside ``[-1, H] x [-1, W]``)."""
    H, W = map_size
    y, x = y - 0.5, x - 0.5  # back to the ops' coordinates
    if not (-1 <= y <= H and -1 <= x <= W):
        return []
    taps = []
    for c, n in ((y, H), (x, W)):
        c = max(c, 0.0)
        c0 = math.floor(c)
        if c0 >= n - 1:
            c0 = c1 = n - 1
            c = float(c0)
        else:
            c1 = c0 + 1
        lc = c - c0
        taps.append(((c0, 1 - lc), (c1, lc)))
    out = {}
    for (r, wy) in taps[0]:
        for (col, wx) in taps[1]:
            out[(r, col)] = out.get((r, col), 0.0) + wy * wx
    return [(k, w) for k, w in out.items() if w > 0]


def check_geometry(geo: dict, *, implementation=None, atol: float = 1e-4) -> None:
    """Checks ``geo`` against the library: the op runs on ramp maps (value = own column or
    row), so its output tells where it read. Raises ``AssertionError`` on a mismatch."""
    import jax.numpy as jnp

    import jax_roi

    H, W = geo["map_size"]
    oh, ow = geo["output_size"]
    s = geo["spatial_scale"]
    if geo["method"] == ROTATED:
        rois = jnp.asarray([[0.0, *geo["box"]]], jnp.float32)
    else:
        rois = jnp.asarray([[0.0, *(v / s for v in geo["box"])]], jnp.float32)
    cols = np.broadcast_to(np.arange(W, dtype=np.float32)[None, :], (H, W))
    rows = np.broadcast_to(np.arange(H, dtype=np.float32)[:, None], (H, W))
    ramps = jnp.asarray(np.stack([cols + 1, rows + 1, -(cols + 1), -(rows + 1)], -1)[None])
    if geo["method"] == "roi_pool":
        # max of (col + 1) over a bin is its last column + 1; max of -(col + 1) is -(first + 1)
        out = np.asarray(jax_roi.roi_pool(ramps, rois, (oh, ow), spatial_scale=s, binning=geo["binning"],
                                          implementation=implementation))[0]
        cells = geo["cells"]
        empty = (cells[..., 2] <= cells[..., 0]) | (cells[..., 3] <= cells[..., 1])
        got = np.stack([-out[..., 2] - 1, -out[..., 3] - 1, out[..., 0], out[..., 1]], -1)
        assert np.all(out[empty] == 0), "roi_pool: a bin drawn empty is not empty in the library"
        np.testing.assert_array_equal(got[~empty], cells[~empty], err_msg="roi_pool bins differ from the library")
        return
    # One sample per output cell on an (oh*gy, ow*gx) grid is the same set of sampling points.
    gy, gx = geo["grid"]
    kw = dict(spatial_scale=s, sampling_ratio=1, implementation=implementation)
    if geo["method"] == "roi_warp":
        out = jax_roi.roi_warp(ramps[..., :2], rois, (oh * gy, ow * gx), **kw)
    elif geo["method"] == ROTATED:
        out = jax_roi.roi_align_rotated(ramps[..., :2], rois, (oh * gy, ow * gx), aligned=geo["aligned"], **kw)
    else:
        out = jax_roi.roi_align(ramps[..., :2], rois, (oh * gy, ow * gx), aligned=geo["aligned"], **kw)
    out = np.asarray(out)[0].reshape(oh, gy, ow, gx, 2).transpose(0, 2, 1, 3, 4)  # [oh, ow, gy, gx, (x, y)]
    pts = geo["samples"] - 0.5 + 1  # the ramps hold coordinate + 1
    # a ramp reports the coordinate exactly where bilinear sampling does not clamp
    inside = (pts[..., 0] >= 1) & (pts[..., 0] <= W) & (pts[..., 1] >= 1) & (pts[..., 1] <= H)
    np.testing.assert_allclose(out[inside], pts[inside], atol=atol,
                               err_msg=f"{geo['method']}: sampling points differ from the library")


_BIN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _draw_panel(ax, geo, *, values=None, highlight=(0, 0, 0, 0)):
    from matplotlib.patches import Rectangle

    H, W = geo["map_size"]
    oh, ow = geo["output_size"]
    if values is not None:
        ax.imshow(values, cmap="Greys", extent=(0, W, H, 0), vmin=0.0, vmax=1.0, alpha=0.3,
                  interpolation="nearest", zorder=0)
    for i in range(H + 1):
        ax.plot([0, W], [i, i], color="0.75", lw=0.8, zorder=1)
    for j in range(W + 1):
        ax.plot([j, j], [0, H], color="0.75", lw=0.8, zorder=1)
    cy, cx = np.mgrid[0:H, 0:W] + 0.5
    ax.scatter(cx.ravel(), cy.ravel(), s=4, color="0.6", zorder=2)
    colour = lambda ph, pw: _BIN_COLOURS[(ph * ow + pw) % len(_BIN_COLOURS)]  # noqa: E731
    if geo["method"] == ROTATED:
        from matplotlib.patches import Polygon

        ax.add_patch(Polygon(geo["corners"], closed=True, fill=False, ec="black", lw=2.2, zorder=6,
                             label="oriented box"))
        for ph in range(oh):
            for pw in range(ow):
                ax.add_patch(Polygon(geo["bins"][ph, pw], closed=True, fc=colour(ph, pw), alpha=0.12,
                                     ec=colour(ph, pw), lw=1.2, ls=":", zorder=3))
                pts = geo["samples"][ph, pw].reshape(-1, 2)
                ax.scatter(pts[:, 0], pts[:, 1], s=30, color=colour(ph, pw), edgecolor="black", lw=0.6, zorder=8)
        _draw_neighbours(ax, geo, highlight)
        return
    x1, y1, x2, y2 = geo["box"]
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="black", lw=2.2, ls="-", zorder=6,
                           label="box"))
    if geo["method"] == "roi_pool":
        rx0, ry0, rx1, ry1 = geo["region"]
        ax.add_patch(Rectangle((rx0, ry0), rx1 - rx0, ry1 - ry0, fill=False, ec="crimson", lw=2, ls="--",
                               zorder=5, label="quantized region"))
        for ph in range(oh):
            for pw in range(ow):
                w0, h0, w1, h1 = geo["cells"][ph, pw]
                if w1 > w0 and h1 > h0:
                    ax.add_patch(Rectangle((w0 + 0.06, h0 + 0.06), w1 - w0 - 0.12, h1 - h0 - 0.12,
                                           fc=colour(ph, pw), alpha=0.28, ec=colour(ph, pw), lw=1.5, zorder=3))
                    ax.text(w0 + 0.15, h0 + 0.42, f"bin ({ph},{pw})", fontsize=7, color=colour(ph, pw), zorder=7)
        return
    rx0, ry0, rx1, ry1 = geo["region"]
    if geo["method"] == "roi_warp":
        ax.add_patch(Rectangle((rx0, ry0), rx1 - rx0, ry1 - ry0, fill=False, ec="crimson", lw=2, ls="--",
                               zorder=5, label="quantized region"))
    elif abs(rx0 - x1) > 1e-9 or abs(ry0 - y1) > 1e-9 or abs(rx1 - x2) > 1e-9 or abs(ry1 - y2) > 1e-9:
        ax.add_patch(Rectangle((rx0, ry0), rx1 - rx0, ry1 - ry0, fill=False, ec="crimson", lw=2, ls="--",
                               zorder=5, label="sampled region (no half-pixel offset)"))
    for ph in range(oh):
        for pw in range(ow):
            bx0, by0, bx1, by1 = geo["bins"][ph, pw]
            ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fc=colour(ph, pw), alpha=0.12,
                                   ec=colour(ph, pw), lw=1.2, ls=":", zorder=3))
            pts = geo["samples"][ph, pw].reshape(-1, 2)
            ax.scatter(pts[:, 0], pts[:, 1], s=30, color=colour(ph, pw), edgecolor="black", lw=0.6, zorder=8)
    _draw_neighbours(ax, geo, highlight)


def _draw_neighbours(ax, geo, highlight):
    """The four bilinear neighbours of the highlighted sample, with their weights."""
    from matplotlib.patches import Rectangle

    H, W = geo["map_size"]
    ph, pw, iy, ix = highlight
    sx_, sy_ = geo["samples"][ph, pw, iy, ix]
    for (r, c), w in bilinear_neighbours(sx_, sy_, (H, W)):
        ax.add_patch(Rectangle((c, r), 1, 1, fill=False, ec="darkviolet", lw=1.6, zorder=4))
        ax.plot([sx_, c + 0.5], [sy_, r + 0.5], color="darkviolet", lw=1.2, zorder=7)
        ax.scatter([c + 0.5], [r + 0.5], s=22, color="darkviolet", zorder=9)
        ax.text(c + 0.5 + (0.08 if c + 0.5 >= sx_ else -0.08), r + 0.5 + (0.3 if r + 0.5 >= sy_ else -0.14),
                f"{w:.2f}", fontsize=7, color="darkviolet", ha="left" if c + 0.5 >= sx_ else "right", zorder=9)
    ax.scatter([sx_], [sy_], s=70, marker="*", color="gold", edgecolor="black", lw=0.8, zorder=10)


def draw_sampling_picture(path: str = "sampling_picture.png", box: Sequence[float] = DEFAULT_BOX,
                          output_size: Any = 2, *, map_size: Sequence[int] = DEFAULT_MAP,
                          spatial_scale: float = 1.0, sampling_ratio: int = 2, aligned: bool = True,
                          binning: str = "caffe", highlight: Sequence[int] = (0, 0, 0, 0),
                          rotated_box: Sequence[float] = DEFAULT_ROTATED_BOX,
                          check: bool = True, implementation=None, dpi: int = 110) -> dict:
    """Draws RoIPool, RoIWarp and RoIAlign for one box, and rotated RoIAlign for an oriented
    box, side by side and saves a PNG at ``path``.

    Args:
      path: where the PNG goes.
      box: ``(x1, y1, x2, y2)`` in image pixels (``spatial_scale`` maps them to the map).
      output_size: bins per side, ``int`` or ``(oh, ow)``.
      map_size: ``(H, W)`` of the feature map.
      sampling_ratio: samples per bin side for RoIWarp and RoIAlign (``<= 0``: adaptive).
      aligned: RoIAlign's half-pixel offset (False: the original Mask R-CNN grid).
      binning: RoIPool's ``"caffe"`` or ``"floor"`` rule.
      highlight: ``(ph, pw, iy, ix)``, the sample whose four bilinear neighbours are drawn.
      rotated_box: ``(x_ctr, y_ctr, w, h, angle)`` for rotated RoIAlign (same output size,
        sampling and ``aligned``), angle in degrees counter-clockwise as drawn.
      check: verify every drawn point and bin against the library (:func:`check_geometry`).

    Returns:
      ``{method: geometry}`` as :func:`sampling_geometry` (:func:`rotated_sampling_geometry`
      for ``"roi_align_rotated"``).
    """
    # The object-oriented API renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure

    geos = {}
    for method in METHODS:
        geos[method] = sampling_geometry(method, box, output_size, map_size=map_size, spatial_scale=spatial_scale,
                                         sampling_ratio=sampling_ratio, aligned=aligned, binning=binning)
        if check:
            check_geometry(geos[method], implementation=implementation)
    geos[ROTATED] = rotated_sampling_geometry(rotated_box, output_size, map_size=map_size, spatial_scale=spatial_scale,
                                              sampling_ratio=sampling_ratio, aligned=aligned)
    if check:
        check_geometry(geos[ROTATED])  # (pure JAX: the path every build has)
    H, W = (int(map_size[0]), int(map_size[1]))
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, (H, W))
    gy, gx = geos["roi_align"]["grid"]
    titles = {
        "roi_pool": f"RoIPool ({binning}): box rounded to cells,\nmax over the whole cells of each bin",
        "roi_warp": f"RoIWarp: box rounded to cells,\n{gy}x{gx} bilinear samples per bin",
        "roi_align": (f"RoIAlign (aligned={aligned}): exact box,\n{gy}x{gx} bilinear samples per bin"),
        ROTATED: (f"Rotated RoIAlign: box turned {rotated_box[4]:g} deg counter-clockwise,\n"
                  f"{geos[ROTATED]['grid'][0]}x{geos[ROTATED]['grid'][1]} bilinear samples per bin, in its frame"),
    }
    fig = Figure(figsize=(20, 5.6))
    axes = fig.subplots(1, 4)
    for ax, method in zip(axes, METHODS + (ROTATED,)):
        _draw_panel(ax, geos[method], values=values, highlight=tuple(highlight))
        ax.set_xlim(-0.3, W + 0.3)
        ax.set_ylim(H + 0.3, -0.3)
        ax.set_aspect("equal")
        ax.set_xticks(range(W + 1))
        ax.set_yticks(range(H + 1))
        ax.tick_params(labelsize=7)
        ax.set_title(titles[method], fontsize=10)
        ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    b = ", ".join(f"{v:g}" for v in box)
    oh, ow = _pair(output_size)
    rb = ", ".join(f"{v:g}" for v in rotated_box)
    fig.suptitle(f"Where each op reads a {H}x{W} feature map for the box ({b}) (black; rotated RoIAlign: "
                 f"({rb}), as (x_ctr, y_ctr, w, h, angle)), {oh}x{ow} output.\n"
                 "Grey dots: feature values (cell centres); coloured: bins and their sampling points; "
                 "violet: the 4 bilinear neighbours of the starred sample, with their weights.", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=dpi)
    return geos
