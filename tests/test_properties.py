"""Property tests: Hypothesis draws shapes, dtypes, options and boxes (edge boxes included)
and checks every built implementation against the float64 oracle and against each other,
outputs and both gradients: RoIAlign / RoIWarp, RoIPool, the position-sensitive ops and
rotated RoIAlign (on the paths that have it).

Fast profile in CI (``ci``); the long one: ``pytest tests/test_properties.py --hypothesis-profile=long``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMPLEMENTATIONS, ROTATED_IMPLEMENTATIONS, TOLERANCE

import jax_roi
import reference as R

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given = hypothesis.given

DTYPES = [np.float64, np.float32, jnp.bfloat16, np.float16]
SPECIAL = [np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -1.0]


@st.composite
def problems(draw, pool=False):
    # Few distinct shapes, so that compiled programs are reused across examples.
    b = draw(st.sampled_from([1, 2]))
    h, w = draw(st.sampled_from([(1, 1), (5, 7), (8, 6)]))
    c = 3
    k = draw(st.sampled_from([0, 5]))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25]))
    size = draw(st.sampled_from([(1, 1), (2, 3)]))
    coord = st.one_of(st.floats(-8, 40, allow_nan=False, width=32), st.sampled_from(SPECIAL))
    rois = np.array([[draw(st.sampled_from([0, b - 1, -1, b])), draw(coord), draw(coord), draw(coord),
                      draw(coord)] for _ in range(k)], np.float64).reshape(k, 5)
    seed = draw(st.integers(0, 2**31 - 1))
    feats = np.random.default_rng(seed).standard_normal((b, h, w, c))
    dtype = draw(st.sampled_from(DTYPES))
    if pool:
        opts = dict(binning=draw(st.sampled_from(["caffe", "floor"])))
    else:
        opts = dict(sampling_ratio=draw(st.sampled_from([-1, 0, 1, 2, 3])), aligned=draw(st.booleans()),
                    reduction=draw(st.sampled_from(["avg", "max"])), quantize=draw(st.booleans()))
    return feats, rois, size, scale, dtype, opts, seed


def _coord_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _align(impl, feats, rois, size, scale, opts):
    opts = dict(opts)
    if opts.pop("quantize"):
        opts.pop("aligned")
        return jax_roi.roi_warp(feats, rois, size, spatial_scale=scale, implementation=impl, **opts)
    return jax_roi.roi_align(feats, rois, size, spatial_scale=scale, implementation=impl, **opts)


def _ref_align_opts(opts):
    opts = dict(opts)
    if opts["quantize"]:
        opts["aligned"] = False
    return opts


def _check(impl_out, ref, dtype, what):
    atol, rtol = TOLERANCE[np.dtype(dtype)]
    scale = max(1.0, float(np.max(np.abs(ref), initial=0)))
    np.testing.assert_allclose(np.asarray(jnp.asarray(impl_out).astype(jnp.float64)), ref,
                               atol=atol * scale * 4, rtol=rtol * 4, err_msg=what)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(problem=problems())
def test_align_and_warp_match_oracle(implementation, problem):
    feats, rois, size, scale, dtype, opts, seed = problem
    f = jnp.asarray(feats, dtype)
    coords = rois.astype(_coord_dtype(dtype))
    out = _align(implementation, f, jnp.asarray(coords), size, scale, opts)
    assert out.dtype == jnp.dtype(dtype) and out.shape == (rois.shape[0],) + size + (feats.shape[-1],)
    ref = R.roi_align_ref(np.asarray(f.astype(jnp.float64)), coords, size, spatial_scale=scale,
                          coord_dtype=_coord_dtype(dtype), **_ref_align_opts(opts))
    _check(out, ref, dtype, "forward")
    if np.dtype(dtype) != np.float64:
        return
    cot = np.random.default_rng(seed + 1).standard_normal(out.shape)
    d_f, d_r = jax.grad(lambda a, r: jnp.sum(_align(implementation, a, r, size, scale, opts) * cot),
                        argnums=(0, 1))(f, jnp.asarray(coords))
    ref_f, ref_r = R.roi_align_ref_vjp(feats, coords, size, cot, spatial_scale=scale, **_ref_align_opts(opts))
    assert np.all(np.isfinite(np.asarray(d_r)))
    _check(d_f, ref_f, dtype, "d_features")
    _check(d_r, ref_r, dtype, "d_boxes")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(problem=problems(pool=True))
def test_pool_matches_oracle(implementation, problem):
    feats, rois, size, scale, dtype, opts, seed = problem
    f = jnp.asarray(feats, dtype)
    coords = rois.astype(_coord_dtype(dtype))
    out = jax_roi.roi_pool(f, jnp.asarray(coords), size, spatial_scale=scale, implementation=implementation, **opts)
    ref = R.roi_pool_ref(np.asarray(f.astype(jnp.float64)), coords, size, spatial_scale=scale,
                         coord_dtype=_coord_dtype(dtype), **opts)
    _check(out, ref, dtype, "forward")
    if np.dtype(dtype) != np.float64:
        return
    cot = np.random.default_rng(seed + 1).standard_normal(out.shape)
    d_f = jax.grad(lambda a: jnp.sum(jax_roi.roi_pool(a, jnp.asarray(coords), size, spatial_scale=scale,
                                                      implementation=implementation, **opts) * cot))(f)
    ref_f, _ = R.roi_pool_ref_vjp(feats, coords, size, cot, spatial_scale=scale, **opts)
    _check(d_f, ref_f, dtype, "d_features")


@pytest.mark.skipif(len(IMPLEMENTATIONS) < 2, reason="one implementation built")
@given(problem=problems())
def test_paths_agree(problem):
    """Kernel and pure-JAX paths agree with each other (float64), outputs and both gradients."""
    feats, rois, size, scale, _, opts, seed = problem
    f = jnp.asarray(feats)
    cot = np.random.default_rng(seed + 1).standard_normal((rois.shape[0],) + size + (feats.shape[-1],))
    results = []
    for impl in IMPLEMENTATIONS:
        def loss(a, r, impl=impl):
            return jnp.sum(_align(impl, a, r, size, scale, opts) * cot)
        results.append((_align(impl, f, jnp.asarray(rois), size, scale, opts),
                        *jax.grad(loss, argnums=(0, 1))(f, jnp.asarray(rois))))
    for a, b in zip(*results):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9, rtol=1e-9)


# ----------------------------------------------------------------------------- position-sensitive


@st.composite
def ps_problems(draw, pool=False):
    """As :func:`problems`, with ``C = C_out * oh * ow`` channels (each bin reads its own group)."""
    b = draw(st.sampled_from([1, 2]))
    h, w = draw(st.sampled_from([(1, 1), (5, 7), (8, 6)]))
    k = draw(st.sampled_from([0, 5]))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25]))
    size = draw(st.sampled_from([(1, 1), (2, 3)]))
    c = draw(st.sampled_from([1, 2])) * size[0] * size[1]
    coord = st.one_of(st.floats(-8, 40, allow_nan=False, width=32), st.sampled_from(SPECIAL))
    rois = np.array([[draw(st.sampled_from([0, b - 1, -1, b])), draw(coord), draw(coord), draw(coord),
                      draw(coord)] for _ in range(k)], np.float64).reshape(k, 5)
    seed = draw(st.integers(0, 2**31 - 1))
    feats = np.random.default_rng(seed).standard_normal((b, h, w, c))
    dtype = draw(st.sampled_from(DTYPES))
    opts = {} if pool else dict(sampling_ratio=draw(st.sampled_from([-1, 0, 1, 2, 3])))
    return feats, rois, size, scale, dtype, opts, seed


def _ps(pool, impl, feats, rois, size, scale, opts):
    op = jax_roi.ps_roi_pool if pool else jax_roi.ps_roi_align
    return op(feats, rois, size, spatial_scale=scale, implementation=impl, **opts)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(problem=ps_problems())
def test_ps_roi_align_matches_oracle(implementation, problem):
    feats, rois, size, scale, dtype, opts, seed = problem
    f = jnp.asarray(feats, dtype)
    coords = rois.astype(_coord_dtype(dtype))
    out = _ps(False, implementation, f, jnp.asarray(coords), size, scale, opts)
    c_out = feats.shape[-1] // (size[0] * size[1])
    assert out.dtype == jnp.dtype(dtype) and out.shape == (rois.shape[0],) + size + (c_out,)
    ref = R.ps_roi_align_ref(np.asarray(f.astype(jnp.float64)), coords, size, spatial_scale=scale,
                             coord_dtype=_coord_dtype(dtype), **opts)
    _check(out, ref, dtype, "forward")
    if np.dtype(dtype) != np.float64:
        return
    cot = np.random.default_rng(seed + 1).standard_normal(out.shape)
    d_f, d_r = jax.grad(lambda a, r: jnp.sum(_ps(False, implementation, a, r, size, scale, opts) * cot),
                        argnums=(0, 1))(f, jnp.asarray(coords))
    ref_f, ref_r = R.ps_roi_align_ref_vjp(feats, coords, size, cot, spatial_scale=scale, **opts)
    assert np.all(np.isfinite(np.asarray(d_r)))
    _check(d_f, ref_f, dtype, "d_features")
    _check(d_r, ref_r, dtype, "d_boxes")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@given(problem=ps_problems(pool=True))
def test_ps_roi_pool_matches_oracle(implementation, problem):
    feats, rois, size, scale, dtype, opts, seed = problem
    f = jnp.asarray(feats, dtype)
    coords = rois.astype(_coord_dtype(dtype))
    out = _ps(True, implementation, f, jnp.asarray(coords), size, scale, opts)
    ref = R.ps_roi_pool_ref(np.asarray(f.astype(jnp.float64)), coords, size, spatial_scale=scale,
                            coord_dtype=_coord_dtype(dtype))
    _check(out, ref, dtype, "forward")
    if np.dtype(dtype) != np.float64:
        return
    cot = np.random.default_rng(seed + 1).standard_normal(out.shape)
    d_f = jax.grad(lambda a: jnp.sum(_ps(True, implementation, a, jnp.asarray(coords), size, scale, opts) * cot))(f)
    _check(d_f, R.ps_roi_pool_ref_vjp(feats, coords, size, cot, spatial_scale=scale)[0], dtype, "d_features")


@pytest.mark.skipif(len(IMPLEMENTATIONS) < 2, reason="one implementation built")
@pytest.mark.parametrize("pool", [False, True], ids=["ps_roi_align", "ps_roi_pool"])
@given(problem=ps_problems())
def test_ps_paths_agree(pool, problem):
    """Kernel and pure-JAX paths of the position-sensitive ops agree (float64), outputs and
    both gradients."""
    feats, rois, size, scale, _, opts, seed = problem
    opts = {} if pool else opts
    f = jnp.asarray(feats)
    c_out = feats.shape[-1] // (size[0] * size[1])
    cot = np.random.default_rng(seed + 1).standard_normal((rois.shape[0],) + size + (c_out,))
    results = []
    for impl in IMPLEMENTATIONS:
        def loss(a, r, impl=impl):
            return jnp.sum(_ps(pool, impl, a, r, size, scale, opts) * cot)
        results.append((_ps(pool, impl, f, jnp.asarray(rois), size, scale, opts),
                        *jax.grad(loss, argnums=(0, 1))(f, jnp.asarray(rois))))
    for a, b in zip(*results):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9, rtol=1e-9)


# ----------------------------------------------------------------------------- rotated


@st.composite
def rotated_problems(draw):
    """Rotated rois ``(batch, x_ctr, y_ctr, w, h, angle)``: centres on, near and far off the
    map, sizes from negative to wider than the map, any angle, and the special values; but no
    1e30 size: a sample of such a box lands on the map only where ``-h/2`` and its offset
    cancel exactly, which float64 (the oracle) does and float32 (every path: pure JAX, CPU
    and CUDA alike) may miss by one rounding, a distance of 1e23 pixels (tests/test_rotated.py
    checks such boxes for bounded time and finite values). Angles stay within a few turns
    (the float32 path rounds a huge angle before the turn, where the float64 oracle does
    not)."""
    b = draw(st.sampled_from([1, 2]))
    h, w = draw(st.sampled_from([(1, 1), (5, 7), (8, 6)]))
    k = draw(st.sampled_from([0, 6, 6]))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25]))
    size = draw(st.sampled_from([(1, 1), (2, 3)]))
    sampling_ratio = draw(st.sampled_from([-1, 0, 1, 2, 3]))
    # Mostly boxes that read the map (image pixels: the map is max(h, w) / scale wide), so that
    # a wrong rotation shows; a special value in one number of four.
    span = max(h, w) / scale
    f32 = lambda v: float(np.float32(v))  # noqa: E731 (bounds a width-32 strategy can hold)
    centre = st.one_of(*[st.floats(f32(-0.3 * span), f32(1.3 * span), allow_nan=False, width=32)] * 3,
                       st.sampled_from(SPECIAL))
    extent = st.one_of(*[st.floats(f32(-0.2 * span), f32(1.5 * span), allow_nan=False, width=32)] * 3,
                       st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -1.0]))
    angle = st.one_of(*[st.floats(-720, 720, allow_nan=False, width=32)] * 3,
                      st.sampled_from([np.nan, np.inf, 0.0, 90.0]))
    batch = st.sampled_from([0, b - 1, 0, b - 1, -1, b])
    rois = np.array([[draw(batch), draw(centre), draw(centre), draw(extent), draw(extent), draw(angle)]
                     for _ in range(k)], np.float64).reshape(k, 6)
    seed = draw(st.integers(0, 2**31 - 1))
    feats = np.random.default_rng(seed).standard_normal((b, h, w, 3))
    dtype = draw(st.sampled_from(DTYPES))
    opts = dict(sampling_ratio=sampling_ratio, aligned=draw(st.booleans()))
    return feats, rois, size, scale, dtype, opts, seed


def _rotated(impl, feats, rois, size, scale, opts):
    return jax_roi.roi_align_rotated(feats, rois, size, spatial_scale=scale, implementation=impl, **opts)


@pytest.mark.parametrize("implementation", ROTATED_IMPLEMENTATIONS)
@given(problem=rotated_problems())
def test_rotated_matches_oracle(implementation, problem):
    """Outputs in every dtype; dead rows (padding, out of the batch, NaN, inf) are zero."""
    feats, rois, size, scale, dtype, opts, _ = problem
    f = jnp.asarray(feats, dtype)
    coords = rois.astype(_coord_dtype(dtype))
    out = _rotated(implementation, f, jnp.asarray(coords), size, scale, opts)
    assert out.dtype == jnp.dtype(dtype) and out.shape == (rois.shape[0],) + size + (feats.shape[-1],)
    ref = R.roi_align_rotated_ref(np.asarray(f.astype(jnp.float64)), coords, size, spatial_scale=scale, **opts)
    _check(out, ref, dtype, "forward")


@pytest.mark.slow  # a reverse-mode compile per drawn configuration
@pytest.mark.parametrize("implementation", ROTATED_IMPLEMENTATIONS)
@given(problem=rotated_problems())
def test_rotated_feature_gradient_matches_oracle(implementation, problem):
    """float64: the feature gradient against the oracle's; the box gradient (all five
    numbers) finite, and zero on the dead rows."""
    feats, rois, size, scale, _, opts, seed = problem
    f = jnp.asarray(feats)
    cot = np.random.default_rng(seed + 1).standard_normal((rois.shape[0],) + size + (feats.shape[-1],))
    d_f, d_r = jax.grad(lambda a, r: jnp.sum(_rotated(implementation, a, r, size, scale, opts) * cot),
                        argnums=(0, 1))(f, jnp.asarray(rois))
    _check(d_f, R.roi_align_rotated_ref_vjp(feats, rois, size, cot, spatial_scale=scale, **opts), np.float64,
           "d_features")
    d_r = np.asarray(d_r)
    assert np.all(np.isfinite(d_r))
    batch = rois[:, 0]
    dead = ~np.all(np.isfinite(rois), axis=1) | (batch < 0) | (batch >= feats.shape[0])
    np.testing.assert_array_equal(d_r[dead], 0)


@pytest.mark.skipif(len(ROTATED_IMPLEMENTATIONS) < 2, reason="roi_align_rotated has one path in this build")
@given(problem=rotated_problems())
def test_rotated_paths_agree(problem):
    """Kernel and pure-JAX paths of roi_align_rotated agree (float64), outputs and both
    gradients."""
    feats, rois, size, scale, _, opts, seed = problem
    f = jnp.asarray(feats)
    cot = np.random.default_rng(seed + 1).standard_normal((rois.shape[0],) + size + (feats.shape[-1],))
    results = []
    for impl in ROTATED_IMPLEMENTATIONS:
        def loss(a, r, impl=impl):
            return jnp.sum(_rotated(impl, a, r, size, scale, opts) * cot)
        results.append((_rotated(impl, f, jnp.asarray(rois), size, scale, opts),
                        *jax.grad(loss, argnums=(0, 1))(f, jnp.asarray(rois))))
    for a, b in zip(*results):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-9, rtol=1e-9)
