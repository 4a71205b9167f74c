"""Float64 NumPy oracle for the jax_roi ops, written as plain loops from the docs.

Clarity over speed: every box, bin and sample is visited by a Python loop; only the
channel axis is vectorised.  Values, weights and gradients are float64 whatever the input
dtype; box/sample coordinates are float64 too unless ``coord_dtype=np.float32`` is asked.

Layout: features NHWC ``[B, H, W, C]``; rois ``[K, 5]`` = ``(batch_index, x1, y1, x2, y2)``
in input-image pixels; outputs ``[K, oh, ow, C]``.

Public API
----------
roi_align_ref(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1,
              aligned=True, reduction="avg", quantize=False, coord_dtype=np.float64)
roi_align_ref_vjp(features, rois, output_size, cotangent, <same options>)
    -> (d_features [B,H,W,C], d_rois [K,5])
roi_pool_ref(features, rois, output_size, spatial_scale=1.0, binning="caffe",
             coord_dtype=np.float64)
roi_pool_ref_vjp(features, rois, output_size, cotangent, spatial_scale=1.0,
                 binning="caffe", coord_dtype=np.float64) -> (d_features, zeros [K,5])
fpn_level_ref(boxes_xyxy, canonical_scale=224, canonical_level=4, k_min=2, k_max=5)
multiscale_roi_align_ref(levels, rois, output_size, spatial_scales, sampling_ratio=-1,
                         aligned=False, canonical_scale=224, canonical_level=4,
                         coord_dtype=np.float64)
round_half_away(v): C's std::round (halves away from zero), exact.
align_sample_coords(...): test helper, the raw sample coordinates of each roi.
POOL_EXAMPLE_MAP (alias RAMP_POOL_MAP): the docs' 8x8 RoIPool example map, [y, x].
RAMP_MAP: the 5x5 ramp f[y, x] = 10*y + x of the roi_align worked example.

Conventions the contract leaves open, fixed here
------------------------------------------------
* Sample counts: no cap, as torchvision 0.29: a fixed sampling_ratio s > 0 gives s samples
  per bin side, adaptive mode g = ceil(bin).  When g exceeds the window M = 2*size + 6
  (size = H for y, W for x) only the M consecutive samples from index
  i0 = clip(floor((-1 - a)/d - 0.5) - 1, 0, g - M) are visited (a = the bin's start,
  d = bin/g): they hold every sample inside [-1, size], the only ones that contribute, so
  absurd boxes stay bounded.  The kernels and the pure-JAX path visit the same window with
  the same coordinate operations (``_AxisSamples``); in float64 it changes nothing.
* ``coord_dtype``: box/sample coordinates are float64 by default (the oracle);
  ``np.float32`` reproduces the float32 coordinate path the docs prescribe for
  float32 features (and torchvision's CPU kernel), which matters only for a sample within
  rounding of a validity/clamp boundary (e.g. x == W exactly in float32 but W + 4e-15 in
  float64).  Values and gradients are always accumulated in float64.
* Batch index: truncated with ``int()`` as torchvision does; non-finite or outside [0, B)
  => all-zero output row, zero gradients.  Any non-finite coordinate => all-zero row.
* Box gradient clamps: every clamp is "clamped" (derivative 0) on its boundary:
  ``y <= 0`` (torchvision's ``if (y <= 0) y = 0``), ``y0 >= H - 1``, and in legacy mode
  ``rh_raw <= 1`` for ``rh = max(rh_raw, 1)``.  Samples at the validity edges (y == -1,
  y == H) are therefore clamped too.
* multiscale: a box whose level is NaN (negative area: exactly one axis inverted) gets no
  level (``fpn_level_ref`` returns -1) and an all-zero row, which is what torchvision's
  MultiScaleRoIAlign gives (the NaN level matches no level); with a single level every box
  goes to it (torchvision skips the mapper then).
"""

import math

import numpy as np

__all__ = [
    "POOL_EXAMPLE_MAP",
    "RAMP_POOL_MAP",
    "RAMP_MAP",
    "round_half_away",
    "roi_align_ref",
    "roi_align_ref_vjp",
    "roi_pool_ref",
    "roi_pool_ref_vjp",
    "fpn_level_ref",
    "multiscale_roi_align_ref",
]

# The docs' 8x8 RoIPool example map; row index is y, column index is x.
POOL_EXAMPLE_MAP = np.array(
    [
        [0.88, 0.44, 0.14, 0.16, 0.37, 0.77, 0.96, 0.27],
        [0.19, 0.45, 0.57, 0.16, 0.63, 0.29, 0.71, 0.70],
        [0.66, 0.26, 0.82, 0.64, 0.54, 0.73, 0.59, 0.26],
        [0.85, 0.34, 0.76, 0.84, 0.29, 0.75, 0.62, 0.25],
        [0.32, 0.74, 0.21, 0.39, 0.34, 0.03, 0.33, 0.48],
        [0.20, 0.14, 0.16, 0.13, 0.73, 0.65, 0.96, 0.32],
        [0.19, 0.69, 0.09, 0.86, 0.88, 0.07, 0.01, 0.48],
        [0.83, 0.24, 0.97, 0.04, 0.24, 0.35, 0.50, 0.91],
    ],
    dtype=np.float64,
)
POOL_EXAMPLE_MAP.setflags(write=False)
RAMP_POOL_MAP = POOL_EXAMPLE_MAP  # alias (both names are in use)

# The roi_align worked example's ramp map f[y, x] = 10*y + x (5x5).
RAMP_MAP = (10.0 * np.arange(5)[:, None] + np.arange(5)[None, :]).astype(np.float64)
RAMP_MAP.setflags(write=False)


# ----------------------------------------------------------------------------- helpers


def _pair(output_size):
    if isinstance(output_size, (int, np.integer)):
        oh = ow = int(output_size)
    else:
        oh, ow = (int(v) for v in output_size)
    if oh < 1 or ow < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size!r}")
    return oh, ow


def round_half_away(v):
    """round() with halves away from zero (C's std::round), exact for every float."""
    v = float(v)
    r = math.floor(v)
    frac = v - r  # exact for |v| < 2**52
    if frac > 0.5:
        return r + 1
    if frac < 0.5:
        return r
    return r + 1 if v > 0 else r


def _as_features(features):
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 4:
        raise ValueError(f"features must be NHWC [B,H,W,C], got shape {f.shape}")
    return f


def _as_rois(rois):
    r = np.asarray(rois, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] != 5:
        raise ValueError(f"rois must be [K,5], got shape {r.shape}")
    return r


def _batch_of(roi, B):
    """Batch index of a roi row (int() truncation, as torchvision), or None => zero row."""
    if not np.all(np.isfinite(roi)):
        return None
    b = int(roi[0])
    if b < 0 or b >= B:
        return None
    return b


def _axis_bilinear(c, size):
    """One axis of torchvision's bilinear_interpolate.

    Returns (valid, i0, i1, l, dl): weight (1 - l) at i0 and l at i1; dl is dl/dc of the
    raw coordinate c, differentiated piecewise (0 where a clamp acts).
    """
    if not (-1.0 <= c <= size):  # NaN lands here too
        return False, 0, 0, 0.0, 0.0
    dl = 1.0
    if c <= 0:
        c = 0.0
        dl = 0.0
    i0 = int(math.floor(c))
    if i0 >= size - 1:
        i0 = i1 = size - 1
        c = float(i0)
        dl = 0.0
    else:
        i1 = i0 + 1
    return True, i0, i1, c - i0, dl


def adaptive_window(size):
    """Samples visited per bin side once an adaptive bin holds more (2*size + 6)."""
    return 2 * int(size) + 6


class _AxisSamples:
    """One axis of one box: torchvision's sample count and the samples the kernels visit.

    ``g`` is the bin's sample count as a Python int (0: none; astronomically large for an
    absurd box), ``g_f`` the divisor ``max(g, 1)`` in ``T``.  ``n`` samples are visited per
    bin: all ``g``, or when ``g`` exceeds ``adaptive_window(size)`` the window of that many
    starting at ``first(p)``, which holds every sample inside [-1, size].
    """

    def __init__(self, T, start, bin_, size, sampling_ratio):
        self.T, self.start, self.bin, self.size = T, start, bin_, size
        self.windowed = False
        if sampling_ratio > 0:
            self.g = int(sampling_ratio)
            self.g_f = T(self.g)
            self.n = self.g
            return
        gf = T(np.ceil(bin_))
        if not np.isfinite(gf) or not gf > 0:
            self.g, self.g_f, self.n = 0, T(1), 0
            return
        self.g = int(gf)
        self.g_f = T(max(gf, T(1)))
        m = adaptive_window(size)
        if gf <= T(m):
            self.n = self.g
        else:
            self.n = m
            self.windowed = True

    def first(self, p):
        """Index (a T value) of the first visited sample of bin p, as the kernels place it."""
        T = self.T
        if not self.windowed:
            return T(0)
        d = T(self.bin / self.g_f)
        a = T(self.start + T(p) * self.bin)
        first = T(np.floor(T(T(T(-1) - a) / d) - T(0.5)) - T(1))
        return T(min(max(first, T(0)), T(self.g_f - T(self.n))))

    def indices(self, p):
        """The visited sample indices of bin p, as T values."""
        T = self.T
        i0 = self.first(p)
        return [T(i0 + T(m)) for m in range(self.n)]

    def pos(self, p, i):
        """Raw coordinate of sample i (a T value or int) of bin p."""
        T = self.T
        return float(T(self.start + T(p) * self.bin) + T(T(T(i) + T(0.5)) * self.bin) / self.g_f)

    def dpos_dbin(self, p, i):
        return p + (float(i) + 0.5) / float(self.g_f)


class _AlignBox:
    """Per-box geometry of roi_align (both axes), with its derivatives.

    The coordinates (sx, sy, rw, rh, bw, bh, the adaptive counts and every sample
    coordinate) are computed in ``coord_dtype`` in torchvision's order of operations;
    the derivatives are float64.  ``gy`` / ``gx`` are torchvision's per-bin sample counts
    (0: none); ``ys(ph)`` / ``xs(pw)`` the sample indices visited.
    """

    def __init__(self, roi, H, W, oh, ow, spatial_scale, sampling_ratio, aligned, quantize,
                 coord_dtype=np.float64):
        T = np.dtype(coord_dtype).type
        self.T = T
        s = T(spatial_scale)
        x1, y1, x2, y2 = (T(v) for v in roi[1:5])
        if quantize:
            aligned = False
            x1s, y1s = T(round_half_away(x1 * s)), T(round_half_away(y1 * s))
            x2s, y2s = T(round_half_away(x2 * s)), T(round_half_away(y2 * s))
        else:
            x1s, y1s, x2s, y2s = x1 * s, y1 * s, x2 * s, y2 * s
        off = T(0.5 if aligned else 0.0)
        self.sx = x1s - off
        self.sy = y1s - off
        ex = x2s - off
        ey = y2s - off
        rw = ex - self.sx
        rh = ey - self.sy
        # d(rw)/d(x2) = s, d(rw)/d(x1) = -s unless the legacy clamp holds it at 1.
        s64 = 0.0 if quantize else float(spatial_scale)
        self.drw = self.drh = s64
        if not aligned:
            if rw <= 1.0:
                rw, self.drw = T(1.0), 0.0
            if rh <= 1.0:
                rh, self.drh = T(1.0), 0.0
        self.rw, self.rh = rw, rh
        self.bw = rw / T(ow)
        self.bh = rh / T(oh)
        self.ay = _AxisSamples(T, self.sy, self.bh, H, sampling_ratio)
        self.ax = _AxisSamples(T, self.sx, self.bw, W, sampling_ratio)
        self.gy, self.gx = self.ay.g, self.ax.g
        # The average's divisor max(gy*gx, 1), in float64 from the per-axis counts (never
        # an int overflow, finite for an absurd box).
        self.count = float(self.ay.g_f) * float(self.ax.g_f)
        self.s = s64
        self.oh, self.ow = oh, ow

    def ys(self, ph):
        return self.ay.indices(ph)

    def xs(self, pw):
        return self.ax.indices(pw)

    def y(self, ph, iy):
        return self.ay.pos(ph, iy)

    def x(self, pw, ix):
        return self.ax.pos(pw, ix)

    def dy(self, ph, iy):
        """(dy/dy1, dy/dy2) of the raw sample coordinate."""
        t = self.ay.dpos_dbin(ph, iy)
        return self.s - t * self.drh / self.oh, t * self.drh / self.oh

    def dx(self, pw, ix):
        t = self.ax.dpos_dbin(pw, ix)
        return self.s - t * self.drw / self.ow, t * self.drw / self.ow


def _sample(fb, H, W, y, x):
    """Bilinear value (C-vector) of one sample and the data for its gradients.

    Returns (value, taps, dv_dy, dv_dx) where taps is a list of (yi, xi, weight) (empty for
    an out-of-range sample) and dv_dy / dv_dx are the C-vector derivatives w.r.t. the raw
    sample coordinates.
    """
    C = fb.shape[-1]
    vy, y0, y1, ly, dly = _axis_bilinear(y, H)
    vx, x0, x1, lx, dlx = _axis_bilinear(x, W)
    if not (vy and vx):
        z = np.zeros(C)
        return z, [], z, z
    hy, hx = 1.0 - ly, 1.0 - lx
    f00, f01, f10, f11 = fb[y0, x0], fb[y0, x1], fb[y1, x0], fb[y1, x1]
    value = hy * hx * f00 + hy * lx * f01 + ly * hx * f10 + ly * lx * f11
    taps = [(y0, x0, hy * hx), (y0, x1, hy * lx), (y1, x0, ly * hx), (y1, x1, ly * lx)]
    dv_dy = dly * (hx * (f10 - f00) + lx * (f11 - f01))
    dv_dx = dlx * (hy * (f01 - f00) + ly * (f11 - f10))
    return value, taps, dv_dy, dv_dx


def _check_reduction(reduction):
    if reduction not in ("avg", "max"):
        raise ValueError(f"reduction must be 'avg' or 'max', got {reduction!r}")


def _align_core(features, rois, output_size, cotangent, spatial_scale, sampling_ratio,
                aligned, reduction, quantize, coord_dtype):
    f = _as_features(features)
    r = _as_rois(rois)
    _check_reduction(reduction)
    oh, ow = _pair(output_size)
    B, H, W, C = f.shape
    K = r.shape[0]
    out = np.zeros((K, oh, ow, C))
    want_grad = cotangent is not None
    if want_grad:
        g_all = np.asarray(cotangent, dtype=np.float64).reshape(K, oh, ow, C)
        d_f = np.zeros_like(f)
        d_r = np.zeros((K, 5))
    for k in range(K):
        b = _batch_of(r[k], B)
        if b is None:
            continue
        fb = f[b]
        box = _AlignBox(r[k], H, W, oh, ow, spatial_scale, sampling_ratio, aligned,
                        quantize, coord_dtype)
        for ph in range(oh):
            for pw in range(ow):
                g = g_all[k, ph, pw] if want_grad else None
                if box.gy <= 0 or box.gx <= 0:
                    continue  # no samples: the bin is 0 and gets no gradient
                if reduction == "avg":
                    acc = np.zeros(C)
                    for iy in box.ys(ph):
                        y = box.y(ph, iy)
                        for ix in box.xs(pw):
                            x = box.x(pw, ix)
                            v, taps, dvy, dvx = _sample(fb, H, W, y, x)
                            acc += v
                            if want_grad:
                                gc = g / box.count
                                for yi, xi, w in taps:
                                    d_f[b, yi, xi] += gc * w
                                dy1, dy2 = box.dy(ph, iy)
                                dx1, dx2 = box.dx(pw, ix)
                                ey = float(np.dot(gc, dvy))
                                ex = float(np.dot(gc, dvx))
                                d_r[k, 1] += ex * dx1
                                d_r[k, 2] += ey * dy1
                                d_r[k, 3] += ex * dx2
                                d_r[k, 4] += ey * dy2
                    out[k, ph, pw] = acc / box.count
                else:  # max, per channel; first winner in (iy, ix) row-major order
                    best = np.full(C, -np.inf)
                    win = [None] * C  # per channel: (taps, dvy, dvx, iy, ix) or None
                    for iy in box.ys(ph):
                        y = box.y(ph, iy)
                        for ix in box.xs(pw):
                            x = box.x(pw, ix)
                            v, taps, dvy, dvx = _sample(fb, H, W, y, x)
                            for c in range(C):
                                if v[c] > best[c]:
                                    best[c] = v[c]
                                    win[c] = (taps, dvy[c], dvx[c], iy, ix)
                    out[k, ph, pw] = best
                    if want_grad:
                        for c in range(C):
                            taps, dvy, dvx, iy, ix = win[c]
                            if not taps:
                                continue  # out-of-range winner: value 0, no gradient
                            for yi, xi, w in taps:
                                d_f[b, yi, xi, c] += g[c] * w
                            dy1, dy2 = box.dy(ph, iy)
                            dx1, dx2 = box.dx(pw, ix)
                            d_r[k, 1] += g[c] * dvx * dx1
                            d_r[k, 2] += g[c] * dvy * dy1
                            d_r[k, 3] += g[c] * dvx * dx2
                            d_r[k, 4] += g[c] * dvy * dy2
    if want_grad:
        if quantize:
            d_r[:] = 0.0
        return d_f, d_r
    return out


# ----------------------------------------------------------------------------- roi_align


def roi_align_ref(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1,
                  aligned=True, reduction="avg", quantize=False, coord_dtype=np.float64):
    """RoIAlign (or RoIWarp with ``quantize=True``) -> [K, oh, ow, C] float64.

    ``coord_dtype=np.float32`` computes the box and sample coordinates in float32, as
    the docs prescribe for float32 features (and torchvision does); it only matters
    where a sample sits within rounding of a validity / clamp boundary."""
    with np.errstate(over="ignore"):  # float32 coordinates of absurd boxes overflow, as in the kernels
        return _align_core(features, rois, output_size, None, spatial_scale, sampling_ratio,
                           aligned, reduction, quantize, coord_dtype)


def roi_align_ref_vjp(features, rois, output_size, cotangent, spatial_scale=1.0,
                      sampling_ratio=-1, aligned=True, reduction="avg", quantize=False,
                      coord_dtype=np.float64):
    """Returns (d_features [B,H,W,C], d_rois [K,5]) for the cotangent [K,oh,ow,C]."""
    with np.errstate(over="ignore"):
        return _align_core(features, rois, output_size, cotangent, spatial_scale,
                           sampling_ratio, aligned, reduction, quantize, coord_dtype)


def align_sample_coords(rois, feature_hw, output_size, spatial_scale=1.0, sampling_ratio=-1,
                        aligned=True, quantize=False):
    """Test helper: per roi, (ys, xs, box) with every raw sample coordinate (None for rows
    that give zero).  Used to keep finite-difference checks away from kinks."""
    H, W = feature_hw
    oh, ow = _pair(output_size)
    res = []
    for roi in _as_rois(rois):
        if not np.all(np.isfinite(roi[1:])):
            res.append(None)
            continue
        with np.errstate(over="ignore"):
            box = _AlignBox(roi, H, W, oh, ow, spatial_scale, sampling_ratio, aligned, quantize)
            ys = [box.y(ph, iy) for ph in range(oh) for iy in box.ys(ph)]
            xs = [box.x(pw, ix) for pw in range(ow) for ix in box.xs(pw)]
        res.append((np.array(ys), np.array(xs), box))
    return res


# ----------------------------------------------------------------------------- roi_pool


def _pool_bins(roi, H, W, oh, ow, spatial_scale, binning, coord_dtype=np.float64):
    """[(h0, h1)] * oh and [(w0, w1)] * ow, half-open, clipped to the map.  The scaled
    coordinates and bin sizes are computed in ``coord_dtype``."""
    T = np.dtype(coord_dtype).type
    s = T(spatial_scale)
    x1, y1, x2, y2 = (T(v) for v in roi[1:5])
    if binning == "caffe":
        sx, sy = round_half_away(x1 * s), round_half_away(y1 * s)
        ex, ey = round_half_away(x2 * s), round_half_away(y2 * s)
        rw = max(ex - sx + 1, 1)
        rh = max(ey - sy + 1, 1)
        bw = T(rw) / T(ow)
        bh = T(rh) / T(oh)
        hb = [(math.floor(T(ph) * bh) + sy, math.ceil(T(ph + 1) * bh) + sy) for ph in range(oh)]
        wb = [(math.floor(T(pw) * bw) + sx, math.ceil(T(pw + 1) * bw) + sx) for pw in range(ow)]
    elif binning == "floor":
        sx, sy = math.floor(x1 * s), math.floor(y1 * s)
        ex, ey = math.floor(x2 * s), math.floor(y2 * s)
        qx = (ex - sx) // ow
        qy = (ey - sy) // oh
        hb = [(sy + ph * qy, sy + (ph + 1) * qy if ph < oh - 1 else ey) for ph in range(oh)]
        wb = [(sx + pw * qx, sx + (pw + 1) * qx if pw < ow - 1 else ex) for pw in range(ow)]
    else:
        raise ValueError(f"binning must be 'caffe' or 'floor', got {binning!r}")

    def clip(lo, hi, n):
        return min(max(lo, 0), n), min(max(hi, 0), n)

    return [clip(a, b, H) for a, b in hb], [clip(a, b, W) for a, b in wb]


def _pool_core(features, rois, output_size, cotangent, spatial_scale, binning, coord_dtype):
    f = _as_features(features)
    r = _as_rois(rois)
    oh, ow = _pair(output_size)
    B, H, W, C = f.shape
    K = r.shape[0]
    out = np.zeros((K, oh, ow, C))
    want_grad = cotangent is not None
    if want_grad:
        g_all = np.asarray(cotangent, dtype=np.float64).reshape(K, oh, ow, C)
        d_f = np.zeros_like(f)
    for k in range(K):
        b = _batch_of(r[k], B)
        if b is None:
            continue
        hb, wb = _pool_bins(r[k], H, W, oh, ow, spatial_scale, binning, coord_dtype)
        for ph, (h0, h1) in enumerate(hb):
            for pw, (w0, w1) in enumerate(wb):
                if h1 <= h0 or w1 <= w0:
                    continue  # empty bin: 0, no gradient
                for c in range(C):
                    best, arg = -np.inf, None
                    for yy in range(h0, h1):  # row-major; strict '>' keeps the first max
                        for xx in range(w0, w1):
                            if f[b, yy, xx, c] > best or arg is None:
                                best, arg = f[b, yy, xx, c], (yy, xx)
                    out[k, ph, pw, c] = best
                    if want_grad:
                        d_f[b, arg[0], arg[1], c] += g_all[k, ph, pw, c]
    if want_grad:
        return d_f, np.zeros((K, 5))
    return out


def roi_pool_ref(features, rois, output_size, spatial_scale=1.0, binning="caffe",
                 coord_dtype=np.float64):
    """RoIPool (max over whole cells) -> [K, oh, ow, C] float64."""
    return _pool_core(features, rois, output_size, None, spatial_scale, binning, coord_dtype)


def roi_pool_ref_vjp(features, rois, output_size, cotangent, spatial_scale=1.0,
                     binning="caffe", coord_dtype=np.float64):
    """Returns (d_features [B,H,W,C], zeros [K,5])."""
    return _pool_core(features, rois, output_size, cotangent, spatial_scale, binning,
                      coord_dtype)


# ----------------------------------------------------------------------------- multi-level


def fpn_level_ref(boxes_xyxy, canonical_scale=224, canonical_level=4, k_min=2, k_max=5):
    """FPN level k (absolute, e.g. 2..5) of each box [N, 4] in image pixels, as torchvision's
    LevelMapper: floor(k0 + log2(sqrt(area) / s0) + 1e-6) clamped to [k_min, k_max].
    A NaN level (negative area) is returned as -1 (no level)."""
    bx = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    out = np.empty(bx.shape[0], dtype=np.int64)
    for i, (x1, y1, x2, y2) in enumerate(bx):
        area = (x2 - x1) * (y2 - y1)
        if not (area >= 0):  # negative or NaN: sqrt is NaN, the level matches nothing
            out[i] = -1
            continue
        s = math.sqrt(area)
        lvl = canonical_level + (math.log2(s / canonical_scale) if s > 0 else -math.inf)
        lvl = math.floor(lvl + 1e-6) if math.isfinite(lvl) else lvl
        if lvl != lvl:  # NaN (inf area / inf)
            out[i] = -1
            continue
        out[i] = int(min(max(lvl, k_min), k_max))
    return out


def multiscale_roi_align_ref(levels, rois, output_size, spatial_scales, sampling_ratio=-1,
                             aligned=False, canonical_scale=224, canonical_level=4,
                             coord_dtype=np.float64):
    """torchvision's MultiScaleRoIAlign: each roi is roi_aligned on its FPN level only.

    levels: list of NHWC [B, Hi, Wi, C] maps, finest first; spatial_scales: their scales
    (2**-k).  k_min / k_max are -log2 of the first / last scale.  -> [K, oh, ow, C]."""
    r = _as_rois(rois)
    oh, ow = _pair(output_size)
    C = np.asarray(levels[0]).shape[-1]
    K = r.shape[0]
    out = np.zeros((K, oh, ow, C))
    if len(levels) == 1:
        lvl_idx = np.zeros(K, dtype=np.int64)
    else:
        k_min = int(round(-math.log2(spatial_scales[0])))
        k_max = int(round(-math.log2(spatial_scales[-1])))
        lv = fpn_level_ref(r[:, 1:5], canonical_scale, canonical_level, k_min, k_max)
        lvl_idx = np.where(lv >= 0, lv - k_min, -1)
    for k in range(K):
        li = int(lvl_idx[k])
        if li < 0:
            continue
        out[k] = roi_align_ref(levels[li], r[k:k + 1], (oh, ow),
                               spatial_scale=spatial_scales[li],
                               sampling_ratio=sampling_ratio, aligned=aligned,
                               coord_dtype=coord_dtype)[0]
    return out


# ----------------------------------------------------------------------------- position-sensitive


def _ps_channel(c, ph, pw, oh, ow):
    """Input channel read by output channel ``c`` of bin ``(ph, pw)``."""
    return (c * oh + ph) * ow + pw


def _ps_groups(features, output_size):
    f = _as_features(features)
    oh, ow = _pair(output_size)
    if f.shape[-1] % (oh * ow):
        raise ValueError(f"channels {f.shape[-1]} are not a multiple of oh*ow = {oh * ow}")
    return f, oh, ow, f.shape[-1] // (oh * ow)


def ps_roi_align_ref(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1,
                     coord_dtype=np.float64):
    """Position-sensitive RoIAlign -> [K, oh, ow, C_out] float64: aligned RoIAlign (the
    geometry of torchvision's ps_roi_align) of each bin on its own input channel."""
    f, oh, ow, c_out = _ps_groups(features, output_size)
    full = roi_align_ref(f, rois, (oh, ow), spatial_scale, sampling_ratio, aligned=True,
                         coord_dtype=coord_dtype)
    out = np.zeros(full.shape[:3] + (c_out,))
    for ph in range(oh):
        for pw in range(ow):
            out[:, ph, pw, :] = full[:, ph, pw, [_ps_channel(c, ph, pw, oh, ow) for c in range(c_out)]]
    return out


def ps_roi_align_ref_vjp(features, rois, output_size, cotangent, spatial_scale=1.0, sampling_ratio=-1,
                         coord_dtype=np.float64):
    """Returns (d_features [B,H,W,C], d_rois [K,5]) for the cotangent [K,oh,ow,C_out]: the
    RoIAlign VJP with the cotangent placed on each bin's own channel."""
    f, oh, ow, c_out = _ps_groups(features, output_size)
    cot = np.asarray(cotangent, np.float64)
    full = np.zeros(cot.shape[:3] + (f.shape[-1],))
    for ph in range(oh):
        for pw in range(ow):
            full[:, ph, pw, [_ps_channel(c, ph, pw, oh, ow) for c in range(c_out)]] = cot[:, ph, pw, :]
    return roi_align_ref_vjp(f, rois, (oh, ow), full, spatial_scale, sampling_ratio, aligned=True,
                             coord_dtype=coord_dtype)


def _ps_pool_bins(roi, H, W, oh, ow, spatial_scale, coord_dtype):
    """torchvision's ps_roi_pool forward bins: ends rounded half away from zero, the box at
    least one cell, edges floor/ceil of the bin size from the start, clipped to [0, n-1]."""
    T = np.dtype(coord_dtype).type
    s = T(spatial_scale)
    x1, y1, x2, y2 = (T(v) for v in roi[1:5])
    sx, sy = round_half_away(x1 * s), round_half_away(y1 * s)
    ex, ey = round_half_away(x2 * s), round_half_away(y2 * s)
    bw = T(max(ex - sx, 1)) / T(ow)
    bh = T(max(ey - sy, 1)) / T(oh)

    def clip(v, n):
        return min(max(v, 0), n - 1)

    hb = [(clip(math.floor(T(p) * bh) + sy, H), clip(math.ceil(T(p + 1) * bh) + sy, H)) for p in range(oh)]
    wb = [(clip(math.floor(T(p) * bw) + sx, W), clip(math.ceil(T(p + 1) * bw) + sx, W)) for p in range(ow)]
    return hb, wb


def _ps_pool_core(features, rois, output_size, cotangent, spatial_scale, coord_dtype):
    f, oh, ow, c_out = _ps_groups(features, output_size)
    r = _as_rois(rois)
    B, H, W, _ = f.shape
    K = r.shape[0]
    out = np.zeros((K, oh, ow, c_out))
    if cotangent is not None:
        cot = np.asarray(cotangent, np.float64)
        d_f = np.zeros_like(f)
    for k in range(K):
        b = _batch_of(r[k], B)
        if b is None:
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            hb, wb = _ps_pool_bins(r[k], H, W, oh, ow, spatial_scale, coord_dtype)
        for ph, (h0, h1) in enumerate(hb):
            for pw, (w0, w1) in enumerate(wb):
                if h1 <= h0 or w1 <= w0:
                    continue  # empty bin: 0, no gradient
                area = (h1 - h0) * (w1 - w0)
                chans = [_ps_channel(c, ph, pw, oh, ow) for c in range(c_out)]
                out[k, ph, pw] = f[b, h0:h1, w0:w1][..., chans].sum(axis=(0, 1)) / area
                if cotangent is not None:
                    cells = d_f[b, h0:h1, w0:w1]  # a view; channels distinct, so += is exact
                    cells[..., chans] += cot[k, ph, pw] / area
    if cotangent is not None:
        return d_f, np.zeros((K, 5))
    return out


def ps_roi_pool_ref(features, rois, output_size, spatial_scale=1.0, coord_dtype=np.float64):
    """Position-sensitive RoIPool (the mean of whole cells) -> [K, oh, ow, C_out] float64."""
    return _ps_pool_core(features, rois, output_size, None, spatial_scale, coord_dtype)


def ps_roi_pool_ref_vjp(features, rois, output_size, cotangent, spatial_scale=1.0, coord_dtype=np.float64):
    """Returns (d_features [B,H,W,C], zeros [K,5]): the transpose of the forward."""
    return _ps_pool_core(features, rois, output_size, cotangent, spatial_scale, coord_dtype)


# --- Rotated RoIAlign (detectron2's ROIAlignRotated) -------------------------------------

def _rotated_samples(roi, H, W, oh, ow, spatial_scale, sampling_ratio, aligned):
    """detectron2's ROIAlignRotated geometry, in float64: yields ``(ph, pw, y, x, weight)``
    per sample, with ``weight = 1 / count`` (the average)."""
    offset = 0.5 if aligned else 0.0
    cx = roi[1] * spatial_scale - offset
    cy = roi[2] * spatial_scale - offset
    w, h = roi[3] * spatial_scale, roi[4] * spatial_scale
    theta = roi[5] * math.pi / 180.0
    if not aligned:
        w, h = max(w, 1.0), max(h, 1.0)
    bin_h, bin_w = h / oh, w / ow
    gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(h / oh))
    gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(w / ow))
    count = max(gh * gw, 1)
    cos, sin = math.cos(theta), math.sin(theta)
    start_h, start_w = -h / 2.0, -w / 2.0
    for ph in range(oh):
        for pw in range(ow):
            for iy in range(max(gh, 0)):
                yy = start_h + ph * bin_h + (iy + 0.5) * bin_h / gh
                for ix in range(max(gw, 0)):
                    xx = start_w + pw * bin_w + (ix + 0.5) * bin_w / gw
                    # Counter-clockwise rotation of (yy, xx) by theta, then the centre.
                    yield ph, pw, yy * cos - xx * sin + cy, yy * sin + xx * cos + cx, 1.0 / count


def _rotated_core(features, rois, output_size, cotangent, spatial_scale, sampling_ratio, aligned):
    f = _as_features(features)
    r = np.asarray(rois, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] != 6:
        raise ValueError(f"rois must be [K,6], got shape {r.shape}")
    oh, ow = _pair(output_size)
    B, H, W, C = f.shape
    out = np.zeros((r.shape[0], oh, ow, C))
    grad = np.zeros_like(f)
    for k, roi in enumerate(r):
        b = _batch_of(roi, B)
        if b is None:
            continue
        for ph, pw, y, x, weight in _rotated_samples(roi, H, W, oh, ow, spatial_scale, sampling_ratio, aligned):
            value, taps, _, _ = _sample(f[b], H, W, y, x)
            out[k, ph, pw] += weight * value
            if cotangent is not None:
                for yi, xi, tw in taps:
                    grad[b, yi, xi] += weight * tw * cotangent[k, ph, pw]
    return out, grad


def roi_align_rotated_ref(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True):
    """Rotated RoIAlign -> [K, oh, ow, C] float64; rois ``[K, 6]`` ``(batch, x_ctr, y_ctr, w,
    h, angle_degrees)``. Sample by sample, as detectron2's CPU kernel."""
    return _rotated_core(features, rois, output_size, None, spatial_scale, sampling_ratio, aligned)[0]


def roi_align_rotated_ref_vjp(features, rois, output_size, cotangent, spatial_scale=1.0, sampling_ratio=-1,
                              aligned=True):
    """The feature gradient of :func:`roi_align_rotated_ref` for ``cotangent [K, oh, ow, C]``."""
    return _rotated_core(features, rois, output_size, np.asarray(cotangent, np.float64), spatial_scale,
                         sampling_ratio, aligned)[1]
