"""The XLA FFI CPU kernels (jax_roi.ffi) against the pure-JAX path and the float64 oracle:
every option, dtype and edge box, outputs, feature gradients and box gradients; channel
counts that exercise the vector loops and their tails; the raw targets' argument checks.

Transformations (vmap folding, HLO, jit/checkpoint/scan) are in test_ffi_transforms.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BOUNDED_TIME_S, timed_forward_backward, DEAD_ROWS, TOLERANCE, random_rois

import jax_roi
import reference as R
from jax_roi import ffi
from jax_roi import xla as X

pytestmark = pytest.mark.skipif("cpu" not in ffi.platforms(), reason="the FFI CPU kernels are not built")

if "cpu" in ffi.platforms():
    from jax_roi.ffi import ops as F

ALIGN_OPTIONS = [
    dict(sampling_ratio=2, aligned=True, reduction="avg", quantize=False),
    dict(sampling_ratio=-1, aligned=True, reduction="avg", quantize=False),
    dict(sampling_ratio=3, aligned=False, reduction="avg", quantize=False),
    dict(sampling_ratio=0, aligned=False, reduction="avg", quantize=False),
    dict(sampling_ratio=1, aligned=True, reduction="avg", quantize=False),
    dict(sampling_ratio=2, aligned=True, reduction="max", quantize=False),
    dict(sampling_ratio=-1, aligned=False, reduction="max", quantize=False),
    dict(sampling_ratio=2, aligned=False, reduction="avg", quantize=True),
    dict(sampling_ratio=-1, aligned=False, reduction="max", quantize=True),
]


def _ids(o):
    name = "warp" if o["quantize"] else "align"
    return f"{name}-{o['reduction']}-sr{o['sampling_ratio']}-{'al' if o['aligned'] else 'legacy'}"


def _inputs(seed, *, dtype=np.float64, B=2, H=9, W=11, C=3, scale=0.5, count=24, edge=True):
    rng = np.random.default_rng(seed)
    feats = jnp.asarray(rng.standard_normal((B, H, W, C)), dtype)
    coord = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rois = random_rois(rng, B, H, W, count, scale=scale, edge=edge).astype(coord)
    return feats, jnp.asarray(rois), rng




def _close(a, b, dtype, scale=1.0):
    atol, rtol = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(jnp.asarray(a, jnp.float64)), np.asarray(jnp.asarray(b, jnp.float64)),
                               atol=atol * scale, rtol=rtol)


# ----------------------------------------------------------------------------- roi_align


@pytest.mark.parametrize("opts", ALIGN_OPTIONS, ids=_ids)
@pytest.mark.parametrize("channels", [3, 37])
def test_align_forward_matches_xla_and_oracle(opts, channels):
    feats, rois, _ = _inputs(10 + channels, C=channels)
    out = F.roi_align(feats, rois, (3, 4), spatial_scale=0.5, **opts)
    np.testing.assert_allclose(out, X.roi_align(feats, rois, (3, 4), spatial_scale=0.5, **opts),
                               atol=1e-12, rtol=1e-12)
    ref = R.roi_align_ref(np.asarray(feats), np.asarray(rois), (3, 4), spatial_scale=0.5, **opts)
    np.testing.assert_allclose(out, ref, atol=1e-10, rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(out)[DEAD_ROWS], 0)


@pytest.mark.parametrize("opts", ALIGN_OPTIONS, ids=_ids)
def test_align_gradients_match_xla_and_oracle(opts):
    feats, rois, rng = _inputs(20, C=5)
    size = (3, 2)
    cot = jnp.asarray(rng.standard_normal((rois.shape[0],) + size + (feats.shape[-1],)))

    def loss(impl):
        return lambda f, r: jnp.sum(impl.roi_align(f, r, size, spatial_scale=0.5, **opts) * cot)

    d_f, d_r = jax.grad(loss(F), argnums=(0, 1))(feats, rois)
    x_f, x_r = jax.grad(loss(X), argnums=(0, 1))(feats, rois)
    np.testing.assert_allclose(d_f, x_f, atol=1e-11, rtol=1e-11)
    np.testing.assert_allclose(d_r, x_r, atol=1e-10, rtol=1e-10)
    ref_f, ref_r = R.roi_align_ref_vjp(np.asarray(feats), np.asarray(rois), size, np.asarray(cot),
                                       spatial_scale=0.5, **opts)
    np.testing.assert_allclose(d_f, ref_f, atol=1e-9, rtol=1e-9)
    np.testing.assert_allclose(d_r, ref_r, atol=1e-8, rtol=1e-8)
    assert np.all(np.isfinite(np.asarray(d_r)))
    np.testing.assert_array_equal(np.asarray(d_r)[DEAD_ROWS], 0)
    np.testing.assert_array_equal(np.asarray(d_r)[:, 0], 0)
    if opts["quantize"]:
        np.testing.assert_array_equal(np.asarray(d_r), 0)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16, np.float64],
                         ids=["f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("reduction", ["avg", "max"])
@pytest.mark.parametrize("channels", [5, 24])
def test_align_dtypes(dtype, reduction, channels):
    feats, rois, rng = _inputs(30, dtype=dtype, C=channels)
    kw = dict(spatial_scale=0.5, sampling_ratio=-1, aligned=True, reduction=reduction, quantize=False)
    out = F.roi_align(feats, rois, (3, 3), **kw)
    assert out.dtype == jnp.dtype(dtype)
    _close(out, X.roi_align(feats, rois, (3, 3), **kw), dtype)
    coord = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    ref = R.roi_align_ref(np.asarray(feats.astype(jnp.float64)), np.asarray(rois), (3, 3), coord_dtype=coord, **kw)
    _close(out, ref, dtype)
    cot = jnp.asarray(rng.standard_normal(out.shape), dtype)

    def loss(impl):
        return lambda f, r: jnp.sum((impl.roi_align(f, r, (3, 3), **kw) * cot).astype(jnp.float32))

    d_f, d_r = jax.grad(loss(F), argnums=(0, 1))(feats, rois)
    x_f, x_r = jax.grad(loss(X), argnums=(0, 1))(feats, rois)
    assert d_f.dtype == jnp.dtype(dtype) and d_r.dtype == rois.dtype
    _close(d_f, x_f, dtype, scale=4)
    # Box gradients are sums over many samples: compare relative to their size.
    _close(d_r, x_r, np.float32 if np.dtype(dtype) != np.float64 else dtype, scale=float(jnp.abs(x_r).max()) * 10)


def test_align_spatial_scale_and_large_sampling_ratio():
    feats, rois, rng = _inputs(40, H=16, W=20, C=9, scale=0.25)
    for sr in (5, 9):  # fixed ratios are never capped, even above ceil(H / oh)
        kw = dict(spatial_scale=0.25, sampling_ratio=sr, aligned=False, reduction="avg", quantize=False)
        out = F.roi_align(feats, rois, (2, 3), **kw)
        ref = R.roi_align_ref(np.asarray(feats), np.asarray(rois), (2, 3), **kw)
        np.testing.assert_allclose(out, ref, atol=1e-10, rtol=1e-10)


def test_align_nchw_and_per_image_boxes_route_to_kernels():
    rng = np.random.default_rng(41)
    feats = jnp.asarray(rng.standard_normal((2, 6, 10, 12)), jnp.float32)  # NCHW
    boxes = jnp.asarray(rng.uniform(0, 10, (2, 5, 4)), jnp.float32)
    boxes = jnp.concatenate([jnp.minimum(boxes[..., :2], boxes[..., 2:]), jnp.maximum(boxes[..., :2], boxes[..., 2:])], -1)
    kw = dict(spatial_scale=0.8, sampling_ratio=2, data_format="NCHW")
    a = jax_roi.roi_align(feats, boxes, (3, 2), implementation="ffi", **kw)
    b = jax_roi.roi_align(feats, boxes, (3, 2), implementation="xla", **kw)
    assert a.shape == (2, 5, 6, 3, 2)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    default = jax_roi.roi_align(feats, boxes, (3, 2), implementation=None, **kw)
    np.testing.assert_array_equal(default, a)  # None picks the kernels on CPU
    w = jax_roi.roi_warp(feats, boxes, 2, implementation="ffi", spatial_scale=0.8, data_format="NCHW")
    np.testing.assert_allclose(w, jax_roi.roi_warp(feats, boxes, 2, implementation="xla", spatial_scale=0.8,
                                                   data_format="NCHW"), atol=1e-5, rtol=1e-5)


def test_align_many_rois_and_channels_f32():
    """Sizes that split work across threads (K > 32 boxes, several channel blocks), vector
    loops and tails (C = 67), against the pure-JAX path in float32."""
    feats, rois, rng = _inputs(42, dtype=np.float32, B=3, H=21, W=17, C=67, count=90)
    for opts in (ALIGN_OPTIONS[1], ALIGN_OPTIONS[5]):
        out = F.roi_align(feats, rois, (4, 3), spatial_scale=0.5, **opts)
        np.testing.assert_allclose(out, X.roi_align(feats, rois, (4, 3), spatial_scale=0.5, **opts),
                                   atol=2e-5, rtol=1e-5)
        cot = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)

        def grad(impl, **extra):
            return jax.grad(lambda f, r: jnp.sum(impl.roi_align(f, r, (4, 3), spatial_scale=0.5, **opts, **extra)
                                                 * cot), argnums=(0, 1))

        # On a GPU the default backward scatters with atomics (bits vary between runs): the
        # repeat below asks for the deterministic one there.
        g = grad(F, **_bitwise_backward())
        d_f, d_r = g(feats, rois)
        x_f, x_r = grad(X)(feats, rois)
        np.testing.assert_allclose(d_f, x_f, atol=5e-5, rtol=1e-4)
        np.testing.assert_allclose(d_r, x_r, atol=2e-3 * float(jnp.abs(x_r).max()), rtol=1e-3)
        # deterministic across runs (channel blocks and box partials are summed in order)
        d_f2, d_r2 = g(feats, rois)
        np.testing.assert_array_equal(d_f, d_f2)
        np.testing.assert_array_equal(d_r, d_r2)


def test_max_ties_go_to_the_first_sample():
    feats = jnp.ones((1, 6, 6, 4), jnp.float64)
    rois = jnp.asarray([[0, 1.0, 1.0, 4.0, 4.0]])
    cot = jnp.ones((1, 2, 2, 4))

    def grad(impl):
        return jax.grad(lambda f: jnp.sum(impl.roi_align(f, rois, (2, 2), sampling_ratio=2, aligned=False,
                                                         reduction="max") * cot))(feats)

    kernel = grad(F)
    np.testing.assert_array_equal(kernel, grad(X))
    assert float(kernel.sum()) == pytest.approx(16.0)


# ----------------------------------------------------------------------------- edge boxes


@pytest.mark.parametrize("opts", [ALIGN_OPTIONS[0], ALIGN_OPTIONS[1], ALIGN_OPTIONS[6]], ids=_ids)
def test_absurd_and_nonfinite_boxes(opts):
    """1e30 boxes, NaN/inf, batch -1 and B, boxes far off the map: zero rows, finite zero
    gradients, bounded time (the adaptive cap), no out-of-bounds reads."""
    feats = jnp.asarray(np.random.default_rng(50).standard_normal((2, 30, 40, 8)), jnp.float32)
    bad = jnp.asarray([
        [0, -1e30, -1e30, 1e30, 1e30], [1, 1e30, 1e30, -1e30, -1e30], [0, 3e38, 3e38, 3.4e38, 3.4e38],
        [0, np.nan, 1, 5, 5], [0, 1, 1, np.inf, 5], [0, -np.inf, 1, 5, 5], [np.nan, 1, 1, 5, 5],
        [-1, 1, 1, 5, 5], [2, 1, 1, 5, 5], [-0.5, 1, 1, 5, 5], [1.999, 1, 1, 5, 5], [2.0001, 1, 1, 5, 5],
        [0, -1e6, -1e6, -1e6 + 1, -1e6 + 1], [1, 1e6, 1e6, 2e6, 2e6],
    ], jnp.float32)
    out = F.roi_align(feats, bad, (7, 7), spatial_scale=16.0, **opts)
    ref = X.roi_align(feats, bad, (7, 7), spatial_scale=16.0, **opts)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(out)))
    dead = np.asarray(out)[3:9]
    np.testing.assert_array_equal(dead, 0)
    np.testing.assert_array_equal(np.asarray(out)[11], 0)  # 2.0001 truncates to 2 == B
    d_f, d_r = jax.grad(lambda f, r: jnp.sum(F.roi_align(f, r, (7, 7), spatial_scale=16.0, **opts) ** 2),
                        argnums=(0, 1))(feats, bad)
    assert np.all(np.isfinite(np.asarray(d_f))) and np.all(np.isfinite(np.asarray(d_r)))
    np.testing.assert_array_equal(np.asarray(d_r)[3:9], 0)


EDGE_BOXES = np.array([
    [0, -1e30, -1e30, 1e30, 1e30], [1, -1e30, 3, 1e30, 20], [0, 2, -1e30, 30, 1e30],
    [0, -3e38, -3e38, 3e38, 3e38], [1, 3e38, 3e38, 3.4e38, 3.4e38], [0, -3.4e38, 1, 3.4e38, 9],
    [1, 1e30, 1e30, -1e30, -1e30], [0, -1e30, -1e30, -1e30 + 1e24, -1e30 + 1e24],
    [0, np.nan, 1, 5, 5], [1, 1, 1, np.inf, 5], [0, -np.inf, 1, 5, 5], [1, 1, -np.inf, 5, np.inf],
    [0, -4e3, -3e3, 4e3, 3e3], [1, -2e6, 1, 2e6, 25],
], np.float32)


@pytest.mark.parametrize("impl", ["ffi", "xla"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [0, -1, 2])
def test_edge_boxes_bounded_time_finite(sampling_ratio, reduction, dtype, impl):
    """1e30, 3e38, -1e30, NaN and inf boxes, adaptive and fixed, on the kernels and the
    pure-JAX path: both visit at most 2*size + 6 samples per bin side whatever the box, so
    forward and backward return quickly (under BOUNDED_TIME_S once compiled) with finite outputs and
    finite feature and box gradients."""
    M = {"ffi": F, "xla": X}[impl]
    feats = jnp.asarray(np.random.default_rng(51).standard_normal((2, 24, 32, 16)), dtype)
    rois = jnp.asarray(EDGE_BOXES.astype(np.float64 if dtype == np.float64 else np.float32))
    kw = dict(spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=True, reduction=reduction)
    fwd = jax.jit(lambda f, r: M.roi_align(f, r, (7, 7), **kw))
    bwd = jax.jit(jax.grad(lambda f, r: jnp.sum(M.roi_align(f, r, (7, 7), **kw) ** 2), argnums=(0, 1)))
    best, out, (d_f, d_r) = timed_forward_backward(fwd, bwd, feats, rois)
    assert best < BOUNDED_TIME_S, best
    for a in (out, d_f, d_r):
        assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(np.asarray(out)[8:12], 0)  # non-finite boxes: zero rows
    np.testing.assert_array_equal(np.asarray(d_r)[8:12], 0)
    if reduction == "avg" and sampling_ratio <= 0:  # the in-range sum over counts of ~1e30 squared
        assert np.abs(np.asarray(out)[:3]).max() < 1e-20
    if dtype == np.float64 and sampling_ratio == 0 and reduction == "avg":  # (the oracle is slow)
        # boxes 100x to 1e5x the map: still the oracle's numbers
        ref = R.roi_align_ref(np.asarray(feats), np.asarray(rois)[12:], (7, 7), **kw)
        np.testing.assert_allclose(np.asarray(out)[12:], ref, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("reduction", ["avg", "max"])
@pytest.mark.parametrize("aligned", [True, False])
def test_windowed_boxes_match_oracle_with_box_gradients(reduction, aligned):
    """Boxes far larger than the map (per-bin counts beyond the 2*size + 6 window, some
    clamped at either end of the bin): outputs, feature and box gradients are the oracle's."""
    rng = np.random.default_rng(52)
    feats = jnp.asarray(rng.standard_normal((2, 6, 8, 5)))
    rois = jnp.asarray([[0, -300.3, -200.7, 310.2, 190.4], [1, -2.5, -150.2, 400.6, 3.7],
                        [0, -900.1, -1.3, 7.9, 700.2], [1, -55.5, -41.2, 60.7, 47.3]])
    kw = dict(sampling_ratio=0, aligned=aligned, reduction=reduction)
    out = F.roi_align(feats, rois, (2, 3), **kw)
    ref = R.roi_align_ref(np.asarray(feats), np.asarray(rois), (2, 3), **kw)
    np.testing.assert_allclose(out, ref, atol=1e-12, rtol=1e-10)
    cot = jnp.asarray(rng.standard_normal(out.shape))
    d_f, d_r = jax.grad(lambda f, r: jnp.sum(F.roi_align(f, r, (2, 3), **kw) * cot), argnums=(0, 1))(feats, rois)
    ref_f, ref_r = R.roi_align_ref_vjp(np.asarray(feats), np.asarray(rois), (2, 3), np.asarray(cot), **kw)
    np.testing.assert_allclose(d_f, ref_f, atol=1e-12, rtol=1e-10)
    np.testing.assert_allclose(d_r, ref_r, atol=1e-12, rtol=1e-9)
    assert np.abs(np.asarray(d_r)).max() > 0


def test_empty_inputs():
    feats = jnp.zeros((2, 5, 6, 3), jnp.float32)
    rois = jnp.zeros((0, 5), jnp.float32)
    out = F.roi_align(feats, rois, (2, 2), sampling_ratio=2)
    assert out.shape == (0, 2, 2, 3)
    d_f, d_r = jax.grad(lambda f, r: jnp.sum(F.roi_align(f, r, (2, 2), sampling_ratio=2)), argnums=(0, 1))(feats, rois)
    np.testing.assert_array_equal(d_f, 0)
    assert d_r.shape == (0, 5)
    assert F.roi_pool(feats, rois, (3, 3)).shape == (0, 3, 3, 3)
    # no channels, one-pixel maps, a single image
    assert F.roi_align(jnp.zeros((1, 4, 4, 0)), jnp.asarray([[0, 0, 0, 2, 2.0]]), (2, 2)).shape == (1, 2, 2, 0)
    one = jnp.full((1, 1, 1, 2), 3.0)
    r = jnp.asarray([[0, -0.5, -0.5, 0.7, 0.9]])
    np.testing.assert_allclose(F.roi_align(one, r, (2, 2), sampling_ratio=2, aligned=False),
                               X.roi_align(one, r, (2, 2), sampling_ratio=2, aligned=False))
    np.testing.assert_allclose(F.roi_pool(one, r, (2, 2)), X.roi_pool(one, r, (2, 2)))


# ----------------------------------------------------------------------------- roi_pool


@pytest.mark.parametrize("binning", ["caffe", "floor"])
@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.parametrize("channels", [3, 37])  # below and above the vector width, ragged
def test_pool_matches_xla_and_oracle(binning, scale, channels):
    feats, rois, rng = _inputs(60 + channels, C=channels, scale=scale)
    out = F.roi_pool(feats, rois, (3, 4), spatial_scale=scale, binning=binning)
    np.testing.assert_array_equal(out, X.roi_pool(feats, rois, (3, 4), spatial_scale=scale, binning=binning))
    ref = R.roi_pool_ref(np.asarray(feats), np.asarray(rois), (3, 4), spatial_scale=scale, binning=binning)
    np.testing.assert_allclose(out, ref, atol=1e-12, rtol=0)
    cot = jnp.asarray(rng.standard_normal(out.shape))

    def loss(impl):
        return lambda f, r: jnp.sum(impl.roi_pool(f, r, (3, 4), spatial_scale=scale, binning=binning) * cot)

    d_f, d_r = jax.grad(loss(F), argnums=(0, 1))(feats, rois)
    np.testing.assert_allclose(d_f, jax.grad(loss(X))(feats, rois), atol=1e-12, rtol=1e-12)
    ref_f, _ = R.roi_pool_ref_vjp(np.asarray(feats), np.asarray(rois), (3, 4), np.asarray(cot),
                                  spatial_scale=scale, binning=binning)
    np.testing.assert_allclose(d_f, ref_f, atol=1e-12, rtol=1e-12)
    np.testing.assert_array_equal(d_r, 0)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16, np.float64],
                         ids=["f32", "bf16", "f16", "f64"])
def test_pool_dtypes(dtype):
    feats, rois, rng = _inputs(70, dtype=dtype, C=19)
    out = F.roi_pool(feats, rois, (3, 3), spatial_scale=0.5)
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float64)),
                                  np.asarray(X.roi_pool(feats, rois, (3, 3), spatial_scale=0.5).astype(jnp.float64)))
    cot = jnp.asarray(rng.standard_normal(out.shape), dtype)
    g = lambda impl: jax.grad(lambda f: jnp.sum((impl.roi_pool(f, rois, (3, 3), spatial_scale=0.5) * cot)
                                                .astype(jnp.float32)))(feats)
    d = g(F)
    assert d.dtype == jnp.dtype(dtype)
    ref, _ = R.roi_pool_ref_vjp(np.asarray(feats.astype(jnp.float64)), np.asarray(rois), (3, 3),
                                np.asarray(cot.astype(jnp.float64)), spatial_scale=0.5)
    _close(d, ref, dtype)
    _close(d, g(X), dtype, scale=4)  # the pure-JAX path scatter-adds in the 16-bit dtype


def test_pool_worked_example_and_first_maximum():
    m = jnp.asarray(R.POOL_EXAMPLE_MAP, jnp.float32)[None, :, :, None]
    # canonical form: rois in the coordinate dtype of float32 features
    floor = F.roi_pool(m, jnp.asarray([[0, 0, 3, 7, 8.0]], jnp.float32), (2, 2), binning="floor")
    np.testing.assert_allclose(floor[0, :, :, 0], [[0.85, 0.84], [0.97, 0.96]], atol=1e-6)
    caffe = F.roi_pool(m, jnp.asarray([[0, 0, 3, 6, 7.0]], jnp.float32), (2, 2), binning="caffe")
    np.testing.assert_allclose(caffe[0, :, :, 0], [[0.85, 0.96], [0.97, 0.96]], atol=1e-6)
    flat = jnp.ones((1, 4, 4, 3))
    d = jax.grad(lambda f: jnp.sum(F.roi_pool(f, jnp.asarray([[0, 0, 0, 3, 3.0]]), (1, 1))))(flat)
    expected = np.zeros((1, 4, 4, 3))
    expected[0, 0, 0] = 1
    np.testing.assert_array_equal(d, expected)


# ----------------------------------------------------------------------------- multi-level


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_multilevel_matches_per_level(sampling_ratio, dtype):
    rng = np.random.default_rng(80)
    scales = [1 / 4, 1 / 8, 1 / 16]
    levels = [jnp.asarray(rng.standard_normal((2, int(48 * s), int(64 * s), 6)), dtype) for s in scales]
    coord = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rois = jnp.asarray(random_rois(rng, 2, 48, 64, 30, scale=1.0).astype(coord))
    level_ids = jnp.asarray(rng.integers(0, 3, rois.shape[0]), jnp.int32)
    kw = dict(spatial_scales=scales, sampling_ratio=sampling_ratio, aligned=True)
    out = F.multilevel_roi_align(levels, rois, level_ids, (3, 2), **kw)
    np.testing.assert_allclose(out, X.multilevel_roi_align(levels, rois, level_ids, (3, 2), **kw),
                               atol=1e-5 if dtype == np.float32 else 1e-12, rtol=1e-5)
    for l, s in enumerate(scales):  # each roi is roi_align on its own level
        mine = np.asarray(level_ids) == l
        np.testing.assert_allclose(np.asarray(out)[mine],
                                   np.asarray(F.roi_align(levels[l], rois, (3, 2), spatial_scale=s,
                                                          sampling_ratio=sampling_ratio))[mine])
    # the kernel gives a level id outside [0, L) a zero row and no gradient
    odd = level_ids.at[:4].set(jnp.asarray([-1, 3, 7, -5], jnp.int32))
    np.testing.assert_array_equal(np.asarray(F.multilevel_roi_align(levels, rois, odd, (3, 2), **kw))[:4], 0)
    outside = np.zeros(rois.shape[0], bool)
    cot = jnp.asarray(rng.standard_normal(out.shape), dtype)

    def loss(impl):
        return lambda ls, r: jnp.sum(impl.multilevel_roi_align(ls, r, level_ids, (3, 2), **kw) * cot)

    d_l, d_r = jax.grad(loss(F), argnums=(0, 1))(levels, rois)
    x_l, x_r = jax.grad(loss(X), argnums=(0, 1))(levels, rois)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for a, b in zip(d_l, x_l):
        np.testing.assert_allclose(a, b, atol=tol, rtol=tol)
    np.testing.assert_allclose(d_r, x_r, atol=tol * max(1.0, float(jnp.abs(x_r).max())), rtol=tol)
    np.testing.assert_array_equal(np.asarray(d_r)[outside], 0)


def test_public_multiscale_uses_one_kernel_call():
    rng = np.random.default_rng(81)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    levels = [jnp.asarray(rng.standard_normal((2, int(64 * s), int(96 * s), 4)), jnp.float32) for s in scales]
    rois = jnp.asarray(random_rois(rng, 2, 64, 96, 20, edge=False).astype(np.float32))
    f = lambda ls, r, impl: jax_roi.multiscale_roi_align(ls, r, 3, spatial_scales=scales, sampling_ratio=2,
                                                         implementation=impl)
    np.testing.assert_allclose(f(levels, rois, "ffi"), f(levels, rois, "xla"), atol=1e-5, rtol=1e-5)
    text = jax.jit(lambda ls, r: f(ls, r, "ffi")).lower(levels, rois).as_text()
    assert text.count("custom_call @jax_roi_roi_align_fwd") == 1


# ----------------------------------------------------------------------------- golden data


def test_torchvision_golden_align_and_pool(golden_data):
    g = golden_data
    feats = jnp.asarray(g["align_features_nhwc"])
    rois = jnp.asarray(g["align_rois"])
    for tag, (scale, sr, aligned, oh, ow) in zip(g["align_tags"], g["align_params"]):
        ok = ~g[f"{tag}_tvfail"]
        out = F.roi_align(feats, rois, (int(oh), int(ow)), spatial_scale=float(scale), sampling_ratio=int(sr),
                          aligned=bool(aligned))
        np.testing.assert_allclose(np.asarray(out)[ok], g[f"{tag}_out_nhwc"][ok], atol=1e-5, rtol=1e-5)
        cot = jnp.asarray(g[f"{tag}_cot_nhwc"])
        d = jax.grad(lambda f: jnp.sum(F.roi_align(f, rois, (int(oh), int(ow)), spatial_scale=float(scale),
                                                   sampling_ratio=int(sr), aligned=bool(aligned)) * cot))(feats)
        np.testing.assert_allclose(d, g[f"{tag}_dfeat_nhwc"], atol=1e-5, rtol=1e-5)
    rois = jnp.asarray(g["pool_rois"])
    for tag, (scale, oh, ow) in zip(g["pool_tags"], g["pool_params"]):
        out = F.roi_pool(feats, rois, (int(oh), int(ow)), spatial_scale=float(scale))
        np.testing.assert_allclose(out, g[f"{tag}_out_nhwc"], atol=1e-6)
        cot = jnp.asarray(g[f"{tag}_cot_nhwc"])
        d = jax.grad(lambda f: jnp.sum(F.roi_pool(f, rois, (int(oh), int(ow)), spatial_scale=float(scale)) * cot))(feats)
        np.testing.assert_allclose(d, g[f"{tag}_dfeat_nhwc"], atol=1e-5)


def test_torchvision_golden_large_boxes(golden_data):
    """Boxes 2x to 4x the map in adaptive mode (counts far above ceil(size / bins), beyond
    the sample window at 1x1): torchvision's numbers, forward and feature gradient, in
    float32, NHWC and NCHW."""
    g = golden_data
    rois = jnp.asarray(g["alignlarge_rois"])
    for tag, (scale, sr, aligned, oh, ow) in zip(g["alignlarge_tags"], g["alignlarge_params"]):
        kw = dict(spatial_scale=float(scale), sampling_ratio=int(sr), aligned=bool(aligned))
        size = (int(oh), int(ow))
        for layout, f in (("nhwc", F.roi_align), ("nchw", functools.partial(jax_roi.roi_align, data_format="NCHW",
                                                                             implementation="ffi"))):
            feats = jnp.asarray(g[f"alignlarge_features_{layout}"])
            want = g[f"{tag}_out_{layout}"]
            out = f(feats, rois, size, **kw)
            np.testing.assert_allclose(out, want, atol=1e-5 * max(1.0, float(np.abs(want).max())), rtol=1e-5,
                                       err_msg=f"{tag} {layout}")
            cot = jnp.asarray(g[f"{tag}_cot_{layout}"])
            d = jax.grad(lambda x: jnp.sum(f(x, rois, size, **kw) * cot))(feats)
            want_d = g[f"{tag}_dfeat_{layout}"]
            np.testing.assert_allclose(d, want_d, atol=1e-5 * max(1.0, float(np.abs(want_d).max())), rtol=1e-5,
                                       err_msg=f"{tag} {layout}")


# ----------------------------------------------------------------------------- raw targets


def _raw_align(rois, level, feats, out_shape, out_dtype, **attrs):
    base = dict(spatial_scales=np.asarray([1.0]), sampling_ratio=np.int64(2), aligned=np.int64(1),
                reduction=np.int64(0), quantize=np.int64(0))
    base.update(attrs)
    call = jax.ffi.ffi_call("jax_roi_roi_align_fwd", jax.ShapeDtypeStruct(out_shape, out_dtype))
    return call(rois, level, *feats, **base)


@pytest.mark.parametrize("case", [
    "rois_dtype", "rois_shape", "level_dtype", "level_len", "out_channels", "out_dtype", "mixed_levels",
    "scales_count", "reduction", "feature_rank", "feature_dtype", "sampling_ratio",
])
def test_raw_target_rejects_bad_arguments(case):
    """Mismatched dtypes or shapes at the custom-call level give InvalidArgument errors with
    a message, never undefined behaviour."""
    f = jnp.zeros((2, 5, 6, 3), jnp.float32)
    rois = jnp.zeros((4, 5), jnp.float32)
    level = jnp.zeros((4,), jnp.int32)
    args = dict(rois=rois, level=level, feats=[f], out_shape=(4, 2, 2, 3), out_dtype=jnp.float32)
    attrs = {}
    if case == "rois_dtype":
        args["rois"] = rois.astype(jnp.float64)
    elif case == "rois_shape":
        args["rois"] = jnp.zeros((4, 4), jnp.float32)
    elif case == "level_dtype":
        args["level"] = level.astype(jnp.int64)
    elif case == "level_len":
        args["level"] = jnp.zeros((3,), jnp.int32)
    elif case == "out_channels":
        args["out_shape"] = (4, 2, 2, 5)
    elif case == "out_dtype":
        args["out_dtype"] = jnp.float16
    elif case == "mixed_levels":
        args["feats"] = [f, jnp.zeros((2, 3, 3, 3), jnp.float16)]
        attrs["spatial_scales"] = np.asarray([1.0, 0.5])
    elif case == "scales_count":
        attrs["spatial_scales"] = np.asarray([1.0, 0.5])
    elif case == "reduction":
        attrs["reduction"] = np.int64(7)
    elif case == "feature_rank":
        args["feats"] = [jnp.zeros((5, 6, 3), jnp.float32)]
    elif case == "feature_dtype":
        args["feats"] = [jnp.zeros((2, 5, 6, 3), jnp.int32)]
    elif case == "sampling_ratio":
        attrs["sampling_ratio"] = np.int64(1 << 40)
    with pytest.raises(Exception, match="jax_roi roi_align forward"):
        jax.block_until_ready(_raw_align(args["rois"], args["level"], args["feats"], args["out_shape"],
                                         args["out_dtype"], **attrs))


def test_raw_target_limits_name_the_attribute():
    """sampling_ratio above 1024 and more than 32 levels are rejected with the attribute, the
    bound and the value given (jax_roi._ext.limits); the bounds themselves are accepted."""
    f = jnp.zeros((1, 4, 4, 2), jnp.float32)
    rois = jnp.asarray([[0, 0, 0, 2, 2]], jnp.float32)
    level = jnp.zeros((1,), jnp.int32)
    out = _raw_align(rois, level, [f], (1, 1, 1, 2), jnp.float32, sampling_ratio=np.int64(1024))
    assert np.all(np.isfinite(np.asarray(out)))
    with pytest.raises(Exception, match=r"sampling_ratio: expected at most 1024 .*got 1025"):
        jax.block_until_ready(_raw_align(rois, level, [f], (1, 1, 1, 2), jnp.float32, sampling_ratio=np.int64(1025)))
    jax.block_until_ready(_raw_align(rois, level, [f] * 32, (1, 1, 1, 2), jnp.float32,
                                     spatial_scales=np.ones(32)))
    with pytest.raises(Exception, match=r"expected at most 32 feature levels, got 33"):
        jax.block_until_ready(_raw_align(rois, level, [f] * 33, (1, 1, 1, 2), jnp.float32,
                                         spatial_scales=np.ones(33)))


def test_raw_pool_and_backward_targets_reject_bad_arguments():
    f = jnp.zeros((2, 5, 6, 3), jnp.float32)
    rois = jnp.zeros((4, 5), jnp.float32)
    with pytest.raises(Exception, match="jax_roi roi_pool forward"):
        jax.block_until_ready(jax.ffi.ffi_call("jax_roi_roi_pool_fwd", jax.ShapeDtypeStruct((4, 2, 2, 3), jnp.float32))(
            rois.astype(jnp.float64), f, spatial_scale=np.float64(1), binning=np.int64(0)))
    with pytest.raises(Exception, match="binning"):
        jax.block_until_ready(jax.ffi.ffi_call("jax_roi_roi_pool_fwd", jax.ShapeDtypeStruct((4, 2, 2, 3), jnp.float32))(
            rois, f, spatial_scale=np.float64(1), binning=np.int64(3)))
    with pytest.raises(Exception, match="d_features"):
        jax.block_until_ready(jax.ffi.ffi_call("jax_roi_roi_pool_bwd", jax.ShapeDtypeStruct((3, 5, 6, 3), jnp.float32))(
            jnp.zeros((4, 2, 2, 3), jnp.float32), rois, f, spatial_scale=np.float64(1), binning=np.int64(0),
            **_cuda_bwd_attrs()))
    outs = [jax.ShapeDtypeStruct((4, 5), jnp.float32), jax.ShapeDtypeStruct((2, 5, 6, 3), jnp.float16)]
    with pytest.raises(Exception, match="jax_roi roi_align backward"):
        jax.block_until_ready(jax.ffi.ffi_call("jax_roi_roi_align_bwd", outs)(
            jnp.zeros((4, 2, 2, 3), jnp.float32), rois, jnp.zeros((4,), jnp.int32), f,
            spatial_scales=np.asarray([1.0]), sampling_ratio=np.int64(2), aligned=np.int64(1),
            reduction=np.int64(0), quantize=np.int64(0), rois_grad=np.int64(1), **_cuda_bwd_attrs()))


def _bitwise_backward():
    """Options for a kernel backward that must repeat bit for bit: the CUDA kernels' default
    backward uses atomics, so on a GPU ask for the deterministic one."""
    return dict(deterministic=True) if jax.default_backend() == "gpu" else {}


def _cuda_bwd_attrs():
    """The backward targets' extra attribute when the "cpu" targets are the emulated CUDA
    kernels (JAX_ROI_EMULATE_CUDA=1): `deterministic`, as on CUDA."""
    return dict(deterministic=np.int64(0)) if ffi.cuda_emulated() else {}


# ----------------------------------------------------------------------------- SIMD variants


def test_baseline_simd_variant_matches(tmp_path):
    """The kernels' baseline (SSE2 / NEON) channel loops, forced with JAX_ROI_NO_AVX2 in a
    child process, agree with the pure-JAX path like the AVX2+FMA ones."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        from jax_roi.ffi import _loader
        from jax_roi.ffi import ops as F
        from jax_roi import xla as X
        assert _loader.load()[0] and _loader._state["ext"].cpu_simd() == "baseline"
        rng = np.random.default_rng(0)
        for dtype in (np.float32, np.float64, jnp.bfloat16):
            f = jnp.asarray(rng.standard_normal((2, 9, 11, 37)), dtype)
            x1 = rng.uniform(-3, 15, 40); y1 = rng.uniform(-3, 12, 40)
            coord = np.float64 if dtype == np.float64 else np.float32
            r = jnp.asarray(np.stack([rng.integers(0, 2, 40), x1, y1, x1 + rng.uniform(0, 9, 40),
                                      y1 + rng.uniform(0, 9, 40)], 1).astype(coord))
            tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
            for kw in (dict(sampling_ratio=2), dict(sampling_ratio=-1, reduction="max")):
                a, b = F.roi_align(f, r, (3, 2), **kw), X.roi_align(f, r, (3, 2), **kw)
                np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol)
                g = lambda impl: jax.grad(lambda f, r: jnp.sum((impl.roi_align(f, r, (3, 2), **kw) ** 2)
                                                                .astype(jnp.float32)), argnums=(0, 1))(f, r)
                for u, v in zip(g(F), g(X)):
                    np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64),
                                               atol=10 * tol, rtol=10 * tol)
            a, b = F.roi_pool(f, r, (3, 2)), X.roi_pool(f, r, (3, 2))
            np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
        print("ok")
    """)
    env = dict(os.environ, JAX_ROI_NO_AVX2="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
