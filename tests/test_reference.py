"""Tests of the float64 NumPy oracle (tests/reference.py).

* the worked examples of the docs;
* unit checks of the contract's corner rules (invalid rows, roi_warp rounding, adaptive
  counts without a cap and the bounded sample window, max ties, out-of-range samples);
* the oracle's analytic gradients against central differences of the oracle itself;
* the oracle against torchvision 0.29 golden data (tests/golden/torchvision_golden.npz,
  written by tests/golden/make_golden.py) at atol 1e-5.
"""

import math
import os
import zlib

import numpy as np
import pytest

import reference as R
from reference import (
    POOL_EXAMPLE_MAP,
    RAMP_MAP,
    RAMP_POOL_MAP,
    fpn_level_ref,
    multiscale_roi_align_ref,
    roi_align_ref,
    roi_align_ref_vjp,
    roi_pool_ref,
    roi_pool_ref_vjp,
    round_half_away,
)

GOLDEN_PATH = os.path.join(os.path.dirname(__file__), "golden", "torchvision_golden.npz")
ATOL = 1e-5


# ============================================================================ worked examples


def test_pool_example_map_constant():
    assert POOL_EXAMPLE_MAP.shape == (8, 8)
    assert RAMP_POOL_MAP is POOL_EXAMPLE_MAP
    # x is the column, y the row
    assert POOL_EXAMPLE_MAP[3, 0] == 0.85 and POOL_EXAMPLE_MAP[7, 2] == 0.97
    assert POOL_EXAMPLE_MAP[5, 6] == 0.96


def test_pool_worked_example_floor():
    f = POOL_EXAMPLE_MAP[None, :, :, None]
    out = roi_pool_ref(f, [[0, 0, 3, 7, 8]], 2, binning="floor")
    np.testing.assert_array_equal(out[0, :, :, 0], [[0.85, 0.84], [0.97, 0.96]])


def test_pool_worked_example_caffe():
    f = POOL_EXAMPLE_MAP[None, :, :, None]
    out = roi_pool_ref(f, [[0, 0, 3, 6, 7]], 2, binning="caffe")
    np.testing.assert_array_equal(out[0, :, :, 0], [[0.85, 0.96], [0.97, 0.96]])
    out_default = roi_pool_ref(f, [[0, 0, 3, 6, 7]], (2, 2))
    np.testing.assert_array_equal(out_default, out)


def test_pool_floor_bins_seed_rule():
    # a 7-wide region in 2 bins is 3 + 4 columns
    hb, wb = R._pool_bins(np.array([0, 0, 0, 7, 7.0]), 8, 8, 2, 2, 1.0, "floor")
    assert wb == [(0, 3), (3, 7)] and hb == [(0, 3), (3, 7)]


@pytest.mark.parametrize(
    "aligned, first_row",
    [(True, [8.25, 8.75, 9.25, 9.75]), (False, [13.75, 14.25, 14.75, 15.25])],
)
def test_ramp_align_worked_example(aligned, first_row):
    f = RAMP_MAP[None, :, :, None]
    out = roi_align_ref(f, [[0, 1, 1, 3, 3]], 4, sampling_ratio=2, aligned=aligned)
    assert out.shape == (1, 4, 4, 1)
    np.testing.assert_allclose(out[0, 0, :, 0], first_row, rtol=0, atol=1e-12)
    # the ramp is linear: each output row is 10 * bin height (0.5) above the previous
    np.testing.assert_allclose(np.diff(out[0, :, :, 0], axis=0), 5.0, atol=1e-12)


def test_round_half_away():
    cases = {2.5: 3, -2.5: -3, 0.5: 1, -0.5: -1, 1.5: 2, 2.4999: 2, -1.2: -1, 0.0: 0,
             0.49999999999999994: 0, 4503599627370495.5: 4503599627370496}
    for v, want in cases.items():
        assert round_half_away(v) == want, v


# ============================================================================ contract corners


def _rand_features(rng, B=2, H=9, W=11, C=3):
    return rng.standard_normal((B, H, W, C))


@pytest.mark.parametrize("reduction", ["avg", "max"])
@pytest.mark.parametrize("quantize", [False, True])
def test_invalid_rows_are_zero(reduction, quantize):
    rng = np.random.default_rng(1)
    f = _rand_features(rng)
    good = [1, 1.2, 2.3, 7.5, 6.1]
    rois = np.array([
        good,
        [-1, 1.2, 2.3, 7.5, 6.1],  # padding convention
        [2, 1.2, 2.3, 7.5, 6.1],  # == B
        [0, np.nan, 2.3, 7.5, 6.1],
        [0, 1.2, np.inf, 7.5, 6.1],
        [np.nan, 1.2, 2.3, 7.5, 6.1],
        [0, 1.2, 2.3, -np.inf, 6.1],
    ])
    kw = dict(sampling_ratio=-1, reduction=reduction, quantize=quantize)
    out = roi_align_ref(f, rois, 3, **kw)
    assert np.all(np.isfinite(out))
    assert np.abs(out[0]).max() > 0
    np.testing.assert_array_equal(out[1:], 0.0)
    cot = rng.standard_normal(out.shape)
    cot[0] = 0.0
    df, dr = roi_align_ref_vjp(f, rois, 3, cot, **kw)
    np.testing.assert_array_equal(df, 0.0)
    np.testing.assert_array_equal(dr, 0.0)
    pout = roi_pool_ref(f, rois, 3)
    np.testing.assert_array_equal(pout[1:], 0.0)
    df, dr = roi_pool_ref_vjp(f, rois, 3, cot)
    np.testing.assert_array_equal(df, 0.0)
    np.testing.assert_array_equal(dr, 0.0)


def test_batch_index_truncates():
    rng = np.random.default_rng(2)
    f = _rand_features(rng)
    a = roi_align_ref(f, [[1.0, 1, 1, 6, 5], [1.9, 1, 1, 6, 5], [-0.5, 1, 1, 6, 5]], 2)
    b = roi_align_ref(f, [[1, 1, 1, 6, 5], [1, 1, 1, 6, 5], [0, 1, 1, 6, 5]], 2)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("reduction", ["avg", "max"])
def test_roi_warp_is_align_on_rounded_box(scale, reduction):
    rng = np.random.default_rng(3)
    f = _rand_features(rng)
    rois = np.array([
        [0, 2.5, 1.5, 13.0, 9.0],  # halves: round away from zero
        [1, -1.0, -3.0, 7.0, 5.0],  # -0.5, -1.5 at scale 0.5
        [0, 5.0, 6.0, 21.0, 17.0],
        [1, 3.3, 2.7, 3.9, 3.1],
    ])
    out = roi_align_ref(f, rois, 3, scale, -1, aligned=True, reduction=reduction,
                        quantize=True)
    q = rois.copy()
    for k in range(len(q)):
        for j in range(1, 5):
            q[k, j] = round_half_away(q[k, j] * scale)
    want = roi_align_ref(f, q, 3, 1.0, -1, aligned=False, reduction=reduction)
    np.testing.assert_allclose(out, want, atol=1e-12)
    # numpy's banker's rounding would differ on the first box at scale 1
    if scale == 1.0:
        qb = rois.copy()
        qb[:, 1:] = np.round(qb[:, 1:])
        banker = roi_align_ref(f, qb, 3, 1.0, -1, aligned=False, reduction=reduction)
        assert np.abs(banker[0] - out[0]).max() > 1e-3


def test_adaptive_count_has_no_cap():
    """Adaptive counts are ceil(bin) on every box, as torchvision; a fixed ratio as given."""
    H, W = 9, 11
    rois = np.array([[0, -50, -40, 80, 70], [0, 0, 0, W, H], [0, 1, 1, 4, 3]], float)
    for aligned in (True, False):
        for oh, ow in ((3, 3), (2, 4), (7, 7)):
            res = R.align_sample_coords(rois, (H, W), (oh, ow), aligned=aligned)
            big = res[0][2]
            assert (big.gy, big.gx) == (math.ceil(110 / oh), math.ceil(130 / ow))
            assert big.gy > math.ceil(H / oh) and big.gx > math.ceil(W / ow)
            assert (res[2][2].gy, res[2][2].gx) == (math.ceil(2 / oh), math.ceil(3 / ow))
    box = R.align_sample_coords(rois, (H, W), (7, 7), sampling_ratio=4)[0][2]
    assert (box.gy, box.gx) == (4, 4)


def _all_samples(axis, p):
    """Every sample index of bin p (no window), for counts small enough to list."""
    return [axis.T(i) for i in range(axis.g)]


@pytest.mark.parametrize("coord_dtype", [np.float64, np.float32])
def test_sample_window_holds_every_in_range_sample(coord_dtype):
    """Beyond 2*size + 6 samples per bin the oracle visits a window of that many; it holds
    every sample inside [-1, size] (the only ones that contribute), on boxes that start
    left of, on and right of the map, and the window start is clamped into the bin."""
    H = 7
    M = R.adaptive_window(H)
    assert M == 2 * H + 6
    for y1, y2, oh in ((-300.0, 40.0, 1), (-100.0, 250.0, 2), (3.0, 500.0, 3), (-900.0, -2.0, 1),
                       (-60.5, 61.25, 1), (-1e4, 1e4, 5)):
        box = R._AlignBox(np.array([0, 0, y1, 1, y2]), H, 1, oh, 1, 1.0, -1, True, False, coord_dtype)
        ay = box.ay
        assert ay.g == int(np.ceil(box.bh)) and ay.windowed == (ay.g > M)
        if not ay.windowed:
            continue
        for p in range(oh):
            idx = ay.indices(p)
            assert len(idx) == M
            first = float(idx[0])
            assert 0 <= first <= ay.g - M and first == math.floor(first)
            want = [i for i in _all_samples(ay, p) if -1 <= ay.pos(p, i) <= H]
            got = [i for i in idx if -1 <= ay.pos(p, i) <= H]
            assert got == want
            assert len(got) < M  # the window also holds out-of-range samples (max sees 0)


def test_absurd_boxes_stay_bounded():
    """A 1e30 box has a count beyond any int, visits 2*size + 6 samples per bin side and
    gives a finite row (near 0 for avg) with finite gradients."""
    rng = np.random.default_rng(3)
    f = rng.standard_normal((1, 6, 8, 2))
    rois = np.array([[0, -1e30, -1e30, 1e30, 1e30], [0, -3e38, -3e38, 3e38, 3e38], [0, -1e30, 2, 1e30, 5]])
    for coord in (np.float64, np.float32):
        for red in ("avg", "max"):
            out = roi_align_ref(f, rois, (2, 3), sampling_ratio=0, reduction=red, coord_dtype=coord)
            assert np.all(np.isfinite(out))
            if red == "avg":  # the in-range sum over a count of ~1e60 (max: some sample's value)
                assert np.abs(out[:2]).max() < 1e-20
            df, dr = roi_align_ref_vjp(f, rois, (2, 3), np.ones_like(out), sampling_ratio=0,
                                       reduction=red, coord_dtype=coord)
            assert np.all(np.isfinite(df)) and np.all(np.isfinite(dr))
        with np.errstate(over="ignore"):
            box = R._AlignBox(rois[0], 6, 8, 2, 3, 1.0, 0, True, False, coord)
        assert box.gy > 2**64 and len(box.ys(0)) == R.adaptive_window(6)
        assert len(box.xs(1)) == R.adaptive_window(8)


@pytest.mark.parametrize("aligned", [True, False])
def test_empty_and_inverted_boxes(aligned):
    rng = np.random.default_rng(4)
    f = _rand_features(rng)
    rois = np.array([[0, 4, 4, 4, 4], [1, 6, 2, 6, 7], [0, 8, 7, 2, 1], [1, 2, 7, 8, 1]], float)
    out = roi_align_ref(f, rois, 3, sampling_ratio=-1, aligned=aligned)
    if aligned:  # no samples in adaptive mode: zero
        np.testing.assert_array_equal(out, 0.0)
    else:  # legacy: malformed boxes become 1x1
        assert np.all(np.abs(out).max(axis=(1, 2, 3)) > 0)
    for red in ("avg", "max"):
        out2 = roi_align_ref(f, rois, 3, sampling_ratio=2, aligned=aligned, reduction=red)
        assert np.all(np.isfinite(out2))


def test_max_out_of_range_sample_counts_as_zero():
    f = -1.0 - np.abs(np.random.default_rng(5).standard_normal((1, 6, 6, 2)))
    rois = np.array([[0, -6, -6, -2.5, -2.5], [0, -3, 1, 3, 4]], float)
    out = roi_align_ref(f, rois, 2, sampling_ratio=2, reduction="max")
    np.testing.assert_array_equal(out[0], 0.0)  # entirely outside
    # the crossing box's left bins hold out-of-range samples: max is 0 there
    assert np.all(out[1, :, 0] == 0.0)
    assert np.all(out[1, :, 1] < 0.0)  # right bins: all samples in range (negative)
    cot = np.ones_like(out)
    cot[1, :, 1] = 0.0  # only the all-out-of-range bins carry a cotangent
    df, dr = roi_align_ref_vjp(f, rois, 2, cot, sampling_ratio=2, reduction="max")
    np.testing.assert_array_equal(df, 0.0)
    np.testing.assert_array_equal(dr, 0.0)


def test_max_ties_go_to_first_sample():
    f = np.ones((1, 8, 8, 1))
    roi = np.array([[0, 1.3, 2.2, 5.1, 6.4]])
    out = roi_align_ref(f, roi, 1, sampling_ratio=2, aligned=False, reduction="max")
    np.testing.assert_allclose(out, 1.0)
    df, _ = roi_align_ref_vjp(f, roi, 1, np.ones((1, 1, 1, 1)), sampling_ratio=2,
                              aligned=False, reduction="max")
    ys, xs, box = R.align_sample_coords(roi, (8, 8), 1, sampling_ratio=2, aligned=False)[0]
    y, x = ys[0], xs[0]  # sample (iy=0, ix=0)
    want = np.zeros((8, 8))
    y0, x0 = int(y), int(x)
    ly, lx = y - y0, x - x0
    want[y0, x0] = (1 - ly) * (1 - lx)
    want[y0, x0 + 1] = (1 - ly) * lx
    want[y0 + 1, x0] = ly * (1 - lx)
    want[y0 + 1, x0 + 1] = ly * lx
    np.testing.assert_allclose(df[0, :, :, 0], want, atol=1e-14)


def test_avg_is_separable():
    """avg == Ay @ F @ Ax^T per channel, Ay / Ax built from one-axis bilinear weights."""
    rng = np.random.default_rng(6)
    H, W, C = 7, 9, 2
    f = rng.standard_normal((1, H, W, C))
    rois = np.array([[0, 1.3, 0.7, 7.9, 5.2], [0, -2.1, 3.3, 4.4, 9.8], [0, 5.5, -1.5, 11, 9]])
    oh, ow = 3, 4
    out = roi_align_ref(f, rois, (oh, ow), sampling_ratio=-1)
    for k, (ys, xs, box) in enumerate(R.align_sample_coords(rois, (H, W), (oh, ow))):
        Ay = np.zeros((oh, H))
        Ax = np.zeros((ow, W))
        for A, n, g, coord in ((Ay, H, box.gy, box.y), (Ax, W, box.gx, box.x)):
            for p in range(A.shape[0]):
                for i in range(g):
                    valid, i0, i1, l, _ = R._axis_bilinear(coord(p, i), n)
                    if valid:
                        A[p, i0] += (1 - l) / g
                        A[p, i1] += l / g
        for c in range(C):
            np.testing.assert_allclose(Ay @ f[0, :, :, c] @ Ax.T, out[k, :, :, c], atol=1e-12)


# ============================================================================ gradients vs FD


def _loss(out, cot):
    return float(np.sum(out * cot))


def _kink_free(rois, hw, output_size, scale, sampling_ratio, aligned, margin=1e-3):
    """True for each roi whose samples are all away from integers (floor changes, the
    0 / H-1 clamps and the -1 / H validity edges), whose adaptive counts are away from a
    ceil jump, and (legacy) whose size is away from the max(., 1) clamp."""
    oh, ow = output_size
    ok = []
    for k, res in enumerate(R.align_sample_coords(rois, hw, output_size, scale, sampling_ratio,
                                                  aligned)):
        ys, xs, box = res
        good = True
        for c in np.concatenate([ys, xs]):
            if abs(c - round(c)) < margin:
                good = False
        s = scale
        rw_raw = (rois[k, 3] - rois[k, 1]) * s
        rh_raw = (rois[k, 4] - rois[k, 2]) * s
        if not aligned and (abs(rw_raw - 1) < margin or abs(rh_raw - 1) < margin):
            good = False
        if sampling_ratio <= 0:
            for v in (box.rw / ow, box.rh / oh):
                if abs(v - round(v)) < margin:
                    good = False
        ok.append(good)
    return np.array(ok)


def _max_gap_ok(f, rois, output_size, scale, sampling_ratio, aligned, margin=1e-3):
    """True for each roi whose max winners are unambiguous (top two samples of every bin
    and channel differ by more than margin)."""
    B, H, W, C = f.shape
    oh, ow = output_size
    ok = []
    for roi in rois:
        box = R._AlignBox(roi, H, W, oh, ow, scale, sampling_ratio, aligned, False)
        b = int(roi[0])
        good = True
        for ph in range(oh):
            for pw in range(ow):
                vals = [R._sample(f[b], H, W, box.y(ph, iy), box.x(pw, ix))[0]
                        for iy in box.ys(ph) for ix in box.xs(pw)]
                if len(vals) >= 2:
                    v = np.sort(np.array(vals), axis=0)
                    if np.min(v[-1] - v[-2]) < margin:
                        good = False
        ok.append(good)
    return np.array(ok)


def _random_boxes(rng, n, B, H, W, scale):
    """Boxes (image pixels) that sit on, cross and leave a map of H x W feature pixels."""
    x1 = rng.uniform(-3, W + 1, n) / scale
    y1 = rng.uniform(-3, H + 1, n) / scale
    w = rng.uniform(0.3, 9, n) / scale
    h = rng.uniform(0.3, 8, n) / scale
    b = rng.integers(0, B, n)
    return np.stack([b, x1, y1, x1 + w, y1 + h], axis=1).astype(np.float64)


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("reduction", ["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("aligned", [True, False])
def test_d_rois_vs_central_differences(aligned, sampling_ratio, reduction, scale):
    rng = np.random.default_rng(zlib.crc32(repr((aligned, sampling_ratio, reduction, scale)).encode()))
    B, H, W, C = 2, 11, 13, 3
    output_size = (3, 3)
    f = rng.standard_normal((B, H, W, C))
    rois = np.zeros((0, 5))
    while rois.shape[0] < 16:
        cand = _random_boxes(rng, 16, B, H, W, scale)
        keep = _kink_free(cand, (H, W), output_size, scale, sampling_ratio, aligned)
        if reduction == "max":
            keep &= _max_gap_ok(f, cand, output_size, scale, sampling_ratio, aligned)
        rois = np.concatenate([rois, cand[keep]])[:16]
    kw = dict(spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned,
              reduction=reduction)
    out = roi_align_ref(f, rois, output_size, **kw)
    cot = rng.standard_normal(out.shape)
    _, dr = roi_align_ref_vjp(f, rois, output_size, cot, **kw)
    assert np.all(dr[:, 0] == 0.0)
    h = 1e-6
    fd = np.zeros_like(dr)
    for j in range(1, 5):  # rows are independent: perturb coordinate j of every roi at once
        rp = rois.copy()
        rm = rois.copy()
        rp[:, j] += h
        rm[:, j] -= h
        op = roi_align_ref(f, rp, output_size, **kw)
        om = roi_align_ref(f, rm, output_size, **kw)
        fd[:, j] = np.sum((op - om) * cot, axis=(1, 2, 3)) / (2 * h)
    np.testing.assert_allclose(dr, fd, rtol=1e-6, atol=1e-6)
    assert np.abs(dr).max() > 0.1  # the check is not vacuous


@pytest.mark.parametrize("reduction", ["avg", "max"])
def test_d_rois_zero_for_quantize(reduction):
    rng = np.random.default_rng(7)
    f = _rand_features(rng)
    rois = _random_boxes(rng, 8, 2, 9, 11, 1.0)
    out = roi_align_ref(f, rois, 3, reduction=reduction, quantize=True)
    _, dr = roi_align_ref_vjp(f, rois, 3, np.ones_like(out), reduction=reduction,
                              quantize=True)
    np.testing.assert_array_equal(dr, 0.0)


def test_d_rois_legacy_clamp_is_flat():
    # legacy mode: a box thinner than 1 pixel has rw clamped to 1 -> x2 has no gradient
    rng = np.random.default_rng(8)
    f = _rand_features(rng)
    rois = np.array([[0, 3.3, 2.2, 3.8, 7.7]])
    out = roi_align_ref(f, rois, 2, sampling_ratio=2, aligned=False)
    _, dr = roi_align_ref_vjp(f, rois, 2, np.ones_like(out), sampling_ratio=2, aligned=False)
    assert dr[0, 3] == 0.0 and dr[0, 1] != 0.0 and dr[0, 4] != 0.0


def _fd_features(fn, f, cot, h=1e-6):
    g = np.zeros_like(f)
    it = np.nditer(f, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        fp = f.copy()
        fm = f.copy()
        fp[idx] += h
        fm[idx] -= h
        g[idx] = (_loss(fn(fp), cot) - _loss(fn(fm), cot)) / (2 * h)
    return g


_SMALL_ROIS = np.array([
    [0, 0.6, 0.4, 4.7, 3.9],
    [1, -1.4, -0.8, 2.3, 2.6],
    [0, 3.1, 2.2, 7.9, 6.3],
    [1, 1.2, 3.6, 1.9, 4.1],
    [0, -3.0, 1.0, 9.0, 4.5],
    [1, 4.2, 0.1, 5.5, 4.9],
])


@pytest.mark.parametrize("reduction", ["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("aligned, quantize", [(True, False), (False, False), (False, True)])
def test_d_features_vs_central_differences(aligned, quantize, sampling_ratio, reduction):
    rng = np.random.default_rng(9)
    f = rng.standard_normal((2, 5, 6, 2))
    kw = dict(spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=aligned,
              reduction=reduction, quantize=quantize)
    out = roi_align_ref(f, _SMALL_ROIS, 3, **kw)
    cot = rng.standard_normal(out.shape)
    df, _ = roi_align_ref_vjp(f, _SMALL_ROIS, 3, cot, **kw)
    fd = _fd_features(lambda x: roi_align_ref(x, _SMALL_ROIS, 3, **kw), f, cot)
    np.testing.assert_allclose(df, fd, rtol=1e-6, atol=1e-7)
    assert np.abs(df).max() > 0.1


@pytest.mark.parametrize("binning", ["caffe", "floor"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_pool_d_features_vs_central_differences(binning, scale):
    rng = np.random.default_rng(10)
    f = rng.standard_normal((2, 5, 6, 2))
    rois = _SMALL_ROIS / np.array([1, scale, scale, scale, scale])
    out = roi_pool_ref(f, rois, (2, 3), scale, binning)
    cot = rng.standard_normal(out.shape)
    df, dr = roi_pool_ref_vjp(f, rois, (2, 3), cot, scale, binning)
    np.testing.assert_array_equal(dr, 0.0)
    fd = _fd_features(lambda x: roi_pool_ref(x, rois, (2, 3), scale, binning), f, cot)
    np.testing.assert_allclose(df, fd, rtol=1e-6, atol=1e-7)
    assert np.abs(df).max() > 0.1


def test_pool_gradient_first_max_cell():
    f = np.zeros((1, 4, 4, 1))
    f[0, 1, 2, 0] = f[0, 2, 1, 0] = 5.0  # tie: (1, 2) comes first in row-major order
    df, _ = roi_pool_ref_vjp(f, [[0, 0, 0, 3, 3]], 1, np.ones((1, 1, 1, 1)))
    assert df[0, 1, 2, 0] == 1.0 and df.sum() == 1.0


def test_fpn_level_ref():
    boxes = np.array([
        [0, 0, 224, 224],  # level 4 exactly
        [0, 0, 112, 112],  # 3
        [0, 0, 56, 56],  # 2
        [0, 0, 10, 10],  # < k_min
        [0, 0, 1000, 1000],  # > k_max
        [5, 5, 5, 5],  # area 0
        [0, 0, 447.9, 447.9],  # just under 5
        [50, 10, 20, 70],  # negative area: no level
    ])
    np.testing.assert_array_equal(fpn_level_ref(boxes, k_min=2, k_max=5),
                                  [4, 3, 2, 2, 5, 2, 4, -1])


def test_multiscale_single_box_per_level():
    rng = np.random.default_rng(11)
    levels = [rng.standard_normal((1, 32 // 2**i, 40 // 2**i, 2)) for i in range(4)]
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    rois = np.array([[0, 10, 10, 66, 66], [0, 0, 0, 112, 112], [0, -40, -30, 184, 194]])
    out = multiscale_roi_align_ref(levels, rois, 3, scales, 2)
    for k, li in enumerate([0, 1, 2]):
        want = roi_align_ref(levels[li], rois[k:k + 1], 3, scales[li], 2, aligned=False)
        np.testing.assert_allclose(out[k:k + 1], want, atol=0)


# ============================================================================ torchvision golden


@pytest.fixture(scope="module")
def golden():
    if not os.path.exists(GOLDEN_PATH):
        pytest.skip("golden data missing (run tests/golden/make_golden.py)")
    with np.load(GOLDEN_PATH) as d:
        return {k: d[k] for k in d.files}


def _golden_tags(family):
    if not os.path.exists(GOLDEN_PATH):
        return []
    with np.load(GOLDEN_PATH) as d:
        return list(d[f"{family}_tags"])


def _align_args(g, tag):
    fam = tag.split("_")[0]
    i = list(g[f"{fam}_tags"]).index(tag)
    s, sr, al, oh, ow = g[f"{fam}_params"][i]
    return fam, dict(spatial_scale=float(s), sampling_ratio=int(sr), aligned=bool(al)), (
        int(oh), int(ow))


def test_golden_metadata(golden):
    assert str(golden["torchvision_version"]).startswith("0.")
    for key in golden:
        if key.endswith("_nchw") and golden[key].ndim == 4:
            np.testing.assert_array_equal(
                np.transpose(golden[key], (0, 2, 3, 1)), golden[key[:-5] + "_nhwc"])


ALIGN_TAGS = _golden_tags("align") + _golden_tags("alignsmall")
LARGE_TAGS = _golden_tags("alignlarge")


@pytest.mark.parametrize("tag", ALIGN_TAGS)
def test_golden_roi_align(golden, tag):
    """Forward and feature gradient vs torchvision on every row (no cap, as torchvision),
    float32 box coordinates (the docs' rule for float32 features, as torchvision)."""
    fam, kw, osz = _align_args(golden, tag)
    f = golden[f"{fam}_features_nhwc"]
    rois = golden[f"{fam}_rois"]
    ok = ~golden[f"{tag}_tvfail"]
    gout = golden[f"{tag}_out_nhwc"]
    ref = roi_align_ref(f, rois, osz, coord_dtype=np.float32, **kw)
    np.testing.assert_allclose(ref[ok], gout[ok], rtol=0, atol=ATOL)
    # rows torchvision's CPU kernel raises on (one axis inverted, adaptive): 0 (the docs)
    np.testing.assert_array_equal(ref[~ok], 0.0)
    df, _ = roi_align_ref_vjp(f, rois, osz, golden[f"{tag}_cot_nhwc"], coord_dtype=np.float32, **kw)
    np.testing.assert_allclose(df, golden[f"{tag}_dfeat_nhwc"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("tag", ALIGN_TAGS)
def test_golden_roi_align_float64_coords(golden, tag):
    """The default float64-coordinate oracle agrees too, except on a row where a sample
    sits on a validity edge within float32-vs-float64 rounding (detected, not assumed)."""
    fam, kw, osz = _align_args(golden, tag)
    f = golden[f"{fam}_features_nhwc"]
    rois = golden[f"{fam}_rois"]
    ok = ~golden[f"{tag}_tvfail"]
    r64 = roi_align_ref(f, rois, osz, **kw)
    r32 = roi_align_ref(f, rois, osz, coord_dtype=np.float32, **kw)
    edge = np.abs(r64 - r32).max(axis=(1, 2, 3)) > ATOL
    assert edge.sum() <= 1
    sel = ok & ~edge
    np.testing.assert_allclose(r64[sel], golden[f"{tag}_out_nhwc"][sel], rtol=0, atol=ATOL)


def test_golden_covers_counts_above_the_old_cap(golden):
    """The golden data holds adaptive rows whose count ceil(bin) exceeds ceil(size / bins)
    (the cap the kernels once had) and, in the large-box family, rows beyond the sample
    window, so the golden tests above and below cover both."""
    above = windowed = 0
    for tag in ALIGN_TAGS + LARGE_TAGS:
        fam, kw, osz = _align_args(golden, tag)
        if kw["sampling_ratio"] > 0:
            continue
        H, W = golden[f"{fam}_features_nhwc"].shape[1:3]
        for ys, xs, box in filter(None, R.align_sample_coords(golden[f"{fam}_rois"], (H, W), osz,
                                                              kw["spatial_scale"], -1, kw["aligned"])):
            above += box.gy > math.ceil(H / osz[0]) or box.gx > math.ceil(W / osz[1])
            windowed += box.ay.windowed or box.ax.windowed
    assert above > 20
    assert windowed > 0 or not LARGE_TAGS


@pytest.mark.parametrize("tag", LARGE_TAGS)
def test_golden_large_boxes(golden, tag):
    """Boxes 2x to 4x the map, adaptive: the oracle equals torchvision, forward and feature
    gradient, in float32 coordinates (as torchvision) on every row, and in float64 on every
    row away from float32 rounding (integer-sized boxes put counts ceil(bin) and samples
    exactly on jumps and edges: a length of 28 in float64 is 28.000002 in float32)."""
    fam, kw, osz = _align_args(golden, tag)
    f = golden[f"{fam}_features_nhwc"]
    rois = golden[f"{fam}_rois"]
    assert not golden[f"{tag}_tvfail"].any()
    ref = roi_align_ref(f, rois, osz, coord_dtype=np.float32, **kw)
    np.testing.assert_allclose(ref, golden[f"{tag}_out_nhwc"], rtol=0, atol=ATOL)
    df, _ = roi_align_ref_vjp(f, rois, osz, golden[f"{tag}_cot_nhwc"], coord_dtype=np.float32, **kw)
    np.testing.assert_allclose(df, golden[f"{tag}_dfeat_nhwc"], rtol=0, atol=ATOL)
    # float64 coordinates: equal except on rows within rounding of a count jump or of a
    # validity edge (detected against float32, not assumed)
    r64 = roi_align_ref(f, rois, osz, **kw)
    edge = np.abs(r64 - ref).max(axis=(1, 2, 3)) > ATOL
    assert edge.sum() <= len(rois) // 4
    np.testing.assert_allclose(r64[~edge], golden[f"{tag}_out_nhwc"][~edge], rtol=0, atol=ATOL)


@pytest.mark.parametrize("tag", _golden_tags("pool"))
@pytest.mark.parametrize("coord_dtype", [np.float64, np.float32])
def test_golden_roi_pool(golden, tag, coord_dtype):
    i = list(golden["pool_tags"]).index(tag)
    s, oh, ow = golden["pool_params"][i]
    f = golden["align_features_nhwc"]
    rois = golden["pool_rois"]
    osz = (int(oh), int(ow))
    ref = roi_pool_ref(f, rois, osz, float(s), coord_dtype=coord_dtype)
    np.testing.assert_allclose(ref, golden[f"{tag}_out_nhwc"], rtol=0, atol=ATOL)
    df, dr = roi_pool_ref_vjp(f, rois, osz, golden[f"{tag}_cot_nhwc"], float(s),
                              coord_dtype=coord_dtype)
    np.testing.assert_allclose(df, golden[f"{tag}_dfeat_nhwc"], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(dr, 0.0)


def test_golden_pool_example(golden):
    np.testing.assert_allclose(golden["poolex_map"], POOL_EXAMPLE_MAP, atol=1e-7)
    np.testing.assert_allclose(golden["poolex_out"], [[0.85, 0.96], [0.97, 0.96]], atol=1e-7)
    ref = roi_pool_ref(POOL_EXAMPLE_MAP[None, :, :, None], golden["poolex_rois"], 2)
    np.testing.assert_allclose(ref[0, :, :, 0], golden["poolex_out"], atol=1e-7)


def _msra_levels(g):
    return [g[f"msra_level{i}_nhwc"] for i in range(4)]


def test_golden_msra_levels(golden):
    rois = golden["msra_rois"]
    b0, b1 = golden["msra_boxes_img0"], golden["msra_boxes_img1"]
    np.testing.assert_array_equal(rois[:, 1:], np.concatenate([b0, b1]))
    np.testing.assert_array_equal(rois[:, 0], [0] * len(b0) + [1] * len(b1))
    np.testing.assert_array_equal(golden["msra_scales"], [1 / 4, 1 / 8, 1 / 16, 1 / 32])
    lv = fpn_level_ref(rois[:, 1:], k_min=2, k_max=5)
    np.testing.assert_array_equal(lv, golden["msra_levels"])
    assert set(lv) == {2, 3, 4, 5}


@pytest.mark.parametrize("tag", _golden_tags("msra"))
def test_golden_msra(golden, tag):
    i = list(golden["msra_tags"]).index(tag)
    sr, oh, ow = (int(v) for v in golden["msra_params"][i])
    levels = _msra_levels(golden)
    scales = list(golden["msra_scales"])
    rois = golden["msra_rois"]
    gout = golden[f"{tag}_out_nhwc"]
    for cd in (np.float32, np.float64):
        ref = multiscale_roi_align_ref(levels, rois, (oh, ow), scales, sr, aligned=False, coord_dtype=cd)
        np.testing.assert_allclose(ref, gout, rtol=0, atol=ATOL)


def test_golden_msra_negative_area(golden):
    levels = [lv[:1] for lv in _msra_levels(golden)]
    ref = multiscale_roi_align_ref(levels, golden["msraneg_rois"], 2,
                                   list(golden["msra_scales"]), 2)
    np.testing.assert_allclose(ref, golden["msraneg_out_nhwc"], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(ref[:2], 0.0)
