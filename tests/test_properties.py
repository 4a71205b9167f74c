"""Property tests: Hypothesis draws shapes, dtypes, options and boxes (edge boxes included)
and checks every built implementation against the float64 oracle and against each other,
outputs and both gradients.

Fast profile in CI (``ci``); the long one: ``pytest tests/test_properties.py --hypothesis-profile=long``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMPLEMENTATIONS, TOLERANCE

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
