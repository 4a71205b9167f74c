"""ps_roi_align / ps_roi_pool (R-FCN): torchvision's golden outputs and gradients in float32
and float64, the float64 oracle with every edge box, gradients in features and boxes by
central differences, the box forms and layouts, transforms, and the argument errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DEAD_ROWS, random_rois

import jax_roi
import reference as R


def _golden_cases(golden):
    for tag, (op, f64, s, sr, oh, ow) in zip(golden["ps_tags"], golden["ps_params"]):
        yield str(tag), int(op), np.float64 if f64 else np.float32, float(s), int(sr), (int(oh), int(ow))


def _op(op, size, s, sr):
    if op == 0:
        return lambda f, r: jax_roi.ps_roi_align(f, r, size, spatial_scale=s, sampling_ratio=sr)
    return lambda f, r: jax_roi.ps_roi_pool(f, r, size, spatial_scale=s)


def test_torchvision_golden(golden_data):
    """Outputs of both ops (torchvision's 0/0 NaN is 0 here) and ps_roi_align's feature
    gradient, in the data's dtype: float32 at 1e-5, float64 at 1e-10. torchvision's
    ps_roi_pool backward clips the bins to the whole map where its forward stops one cell
    short, so it is not the forward's transpose; ours is (checked against the oracle below)."""
    g = golden_data
    rois = g["pool_rois"]
    for tag, op, dtype, s, sr, size in _golden_cases(g):
        tol = 1e-10 if dtype == np.float64 else 1e-5
        fn = _op(op, size, s, sr)
        r = jnp.asarray(rois.astype(dtype))
        feats = jnp.asarray(g[f"{tag}_features_nhwc"])
        out, pullback = jax.vjp(lambda f: fn(f, r), feats)
        assert out.dtype == dtype
        np.testing.assert_allclose(out, np.nan_to_num(g[f"{tag}_out_nhwc"]), atol=tol, rtol=tol, err_msg=tag)
        if op == 0:
            d_f = pullback(jnp.asarray(g[f"{tag}_cot_nhwc"]))[0]
            np.testing.assert_allclose(d_f, g[f"{tag}_dfeat_nhwc"], atol=tol, rtol=tol, err_msg=tag)


def _inputs(seed, size, dtype=np.float64, c_out=2):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((2, 9, 11, c_out * size[0] * size[1])).astype(dtype)
    rois = random_rois(rng, 2, 9, 11, 12, scale=0.5)
    return jnp.asarray(feats), jnp.asarray(rois.astype(dtype)), rng


@pytest.mark.parametrize("size, sr", [((3, 2), 2), ((2, 2), -1), ((1, 3), 0)])
def test_matches_oracle_with_gradients(size, sr):
    feats, rois, rng = _inputs(1, size)
    out = jax_roi.ps_roi_align(feats, rois, size, spatial_scale=0.5, sampling_ratio=sr)
    np.testing.assert_allclose(out, R.ps_roi_align_ref(feats, rois, size, 0.5, sr), atol=1e-12)
    np.testing.assert_array_equal(np.asarray(out)[DEAD_ROWS], 0)
    assert float(jnp.max(jnp.abs(out))) > 0.1
    cot = rng.standard_normal(out.shape)
    d_f, d_r = jax.grad(lambda f, r: jnp.sum(jax_roi.ps_roi_align(f, r, size, spatial_scale=0.5,
                                                                  sampling_ratio=sr) * cot), argnums=(0, 1))(feats, rois)
    want_f, want_r = R.ps_roi_align_ref_vjp(feats, rois, size, cot, 0.5, sr)
    np.testing.assert_allclose(d_f, want_f, atol=1e-12)
    finite = np.all(np.isfinite(np.asarray(rois)), axis=1)
    np.testing.assert_allclose(np.asarray(d_r)[finite], want_r[finite], atol=1e-9)
    assert np.all(np.isfinite(np.asarray(d_r)))

    pooled = jax_roi.ps_roi_pool(feats, rois, size, spatial_scale=0.5)
    np.testing.assert_allclose(pooled, R.ps_roi_pool_ref(feats, rois, size, 0.5), atol=1e-12)
    d_f = jax.grad(lambda f: jnp.sum(jax_roi.ps_roi_pool(f, rois, size, spatial_scale=0.5) * cot))(feats)
    np.testing.assert_allclose(d_f, R.ps_roi_pool_ref_vjp(feats, rois, size, cot, 0.5)[0], atol=1e-12)


def test_box_gradient_by_central_differences():
    """ps_roi_align's derivative in all four box coordinates against central differences,
    on boxes away from the sampling grid's kinks."""
    size = (2, 2)
    rng = np.random.default_rng(3)
    feats = jnp.asarray(rng.standard_normal((1, 9, 11, 2 * 4)))
    rois = jnp.asarray([[0, 2.3, 1.7, 14.1, 12.6], [0, 5.2, 3.3, 18.9, 15.1]])
    cot = jnp.asarray(rng.standard_normal((2, 2, 2, 2)))

    def loss(r):
        return jnp.sum(jax_roi.ps_roi_align(feats, r, size, spatial_scale=0.5, sampling_ratio=2) * cot)

    grad = np.asarray(jax.grad(loss)(rois))
    eps = 1e-6
    for k in range(2):
        for j in range(1, 5):
            e = np.zeros((2, 5))
            e[k, j] = eps
            fd = (loss(rois + e) - loss(rois - e)) / (2 * eps)
            np.testing.assert_allclose(grad[k, j], fd, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("op", ["align", "pool"])
def test_forms_layouts_and_transforms(op):
    """Per-image boxes equal the rois form, NCHW equals NHWC, and jit / vmap / jacfwd
    agree with the plain call."""
    size = (2, 3)
    feats, _, rng = _inputs(4, size)
    boxes = jnp.asarray(np.stack([random_rois(rng, 1, 9, 11, 4, scale=0.5, edge=False)[:, 1:] for _ in range(2)]))
    rois = jnp.concatenate([jnp.repeat(jnp.arange(2.0), 4)[:, None], boxes.reshape(8, 4)], axis=1)
    fn = {"align": functools.partial(jax_roi.ps_roi_align, output_size=size, spatial_scale=0.5, sampling_ratio=2),
          "pool": functools.partial(jax_roi.ps_roi_pool, output_size=size, spatial_scale=0.5)}[op]
    flat = fn(feats, rois)
    np.testing.assert_allclose(fn(feats, boxes).reshape(flat.shape), flat, atol=1e-12)
    nchw = fn(jnp.moveaxis(feats, -1, 1), rois, data_format="NCHW")
    np.testing.assert_allclose(jnp.moveaxis(nchw, 1, -1), flat, atol=1e-12)
    np.testing.assert_allclose(jax.jit(fn)(feats, rois), flat, atol=1e-12)
    stacked = jax.vmap(fn, in_axes=(0, None))(jnp.stack([feats, 2 * feats]), rois)
    np.testing.assert_allclose(stacked[1], 2 * flat, atol=1e-12)
    jac = jax.jacfwd(lambda f: fn(f, rois[:2]))(feats)
    jac_rev = jax.jacrev(lambda f: fn(f, rois[:2]))(feats)
    np.testing.assert_allclose(jac, jac_rev, atol=1e-12)


def test_errors_name_the_argument():
    feats = jnp.zeros((1, 5, 5, 7))
    rois = jnp.asarray([[0, 1.0, 1, 3, 3]])
    with pytest.raises(ValueError, match=r"features: expected a channel count that is a positive multiple of "
                                         r"oh \* ow = 4 .*got 7 channels"):
        jax_roi.ps_roi_align(feats, rois, 2)
    with pytest.raises(ValueError, match=r"implementation: expected None or 'xla' for ps_roi_pool.*got 'ffi'"):
        jax_roi.ps_roi_pool(jnp.zeros((1, 5, 5, 8)), rois, 2, implementation="ffi")


@pytest.mark.parametrize("name", ["PSRoIAlign", "PSRoIPool"])
def test_linen_and_nnx_modules(name):
    """Stateless modules equal to the function (jit, ``dtype`` cast) in both Flax APIs."""
    from jax_roi import linen, nnx

    size = (2, 3)
    feats, rois, _ = _inputs(5, size, dtype=np.float32)
    fn = {"PSRoIAlign": functools.partial(jax_roi.ps_roi_align, sampling_ratio=2),
          "PSRoIPool": jax_roi.ps_roi_pool}[name]
    want = jax.jit(lambda f, r: fn(f, r, size, spatial_scale=0.5))(feats, rois)
    module = getattr(linen, name)(size, spatial_scale=0.5, **({"sampling_ratio": 2} if name == "PSRoIAlign" else {}))
    variables = module.init(jax.random.key(0), feats, rois)
    assert jax.tree_util.tree_leaves(variables) == []
    np.testing.assert_allclose(jax.jit(module.apply)(variables, feats, rois), want, atol=1e-6)
    n = getattr(nnx, name)(size, spatial_scale=0.5, dtype=jnp.bfloat16,
                           **({"sampling_ratio": 2} if name == "PSRoIAlign" else {}))
    out = n(feats, rois)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), want, atol=3e-2, rtol=2e-2)
