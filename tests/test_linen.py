"""jax_roi.linen: stateless flax.linen wrappers that equal the functions, under nn.jit,
nn.remat, nn.scan and jax.grad, with Flax's dtype convention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roi
from jax_roi import linen as L

SCALES = (1 / 2, 1 / 4)


def _inputs(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    feats = jnp.asarray(rng.standard_normal((2, 8, 10, 3)), dtype)
    xy = rng.uniform(0, 10, (2, 3, 2))
    wh = rng.uniform(1, 8, (2, 3, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + wh], -1), jnp.float32)
    return feats, boxes


def _levels(feats):
    return [feats, feats[:, ::2, ::2]]


# Each module with its function: (module, function, keyword arguments, features maker).
CASES = {
    "RoIAlign": (L.RoIAlign, jax_roi.roi_align,
                 dict(spatial_scale=0.5, sampling_ratio=2, aligned=False, reduction="max"), lambda f: f),
    "RoIWarp": (L.RoIWarp, jax_roi.roi_warp, dict(spatial_scale=0.5, sampling_ratio=-1), lambda f: f),
    "RoIPool": (L.RoIPool, jax_roi.roi_pool, dict(spatial_scale=0.5, binning="floor"), lambda f: f),
    "MultiScaleRoIAlign": (L.MultiScaleRoIAlign, jax_roi.multiscale_roi_align,
                           dict(spatial_scales=SCALES, sampling_ratio=2, canonical_scale=8, canonical_level=2),
                           _levels),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equals_function_and_has_no_variables(name):
    implementation = None  # the default (fastest built) path; the paths themselves are tested with the functions
    module_cls, fn, kw, make = CASES[name]
    feats, boxes = _inputs()
    x = make(feats)
    module = module_cls((2, 3), implementation=implementation, **kw)
    variables = jax.eval_shape(module.init, jax.random.key(0), x, boxes)
    assert jax.tree_util.tree_leaves(variables) == []
    out = jax.jit(module.apply)(variables, x, boxes)
    expect = jax.jit(lambda x, b: fn(x, b, (2, 3), implementation=implementation, **kw))(x, boxes)
    assert out.shape == (2, 3, 2, 3, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, expect)
    # unbound call, the [K, 5] rois form and a list output_size
    rois = jnp.concatenate([jnp.repeat(jnp.arange(2.0), 3)[:, None], boxes.reshape(6, 4)], axis=1)
    out_rois = jax.jit(lambda x, r: module_cls([2, 3], implementation=implementation, **kw)(x, r))(x, rois)
    np.testing.assert_allclose(out_rois, expect.reshape(out_rois.shape), atol=2e-6)


def test_nchw():
    feats, boxes = _inputs()
    x = jnp.moveaxis(feats, -1, 1)
    out = jax.jit(L.RoIAlign(2, spatial_scale=0.5, data_format="NCHW").apply)({}, x, boxes)
    nhwc = jax.jit(L.RoIAlign(2, spatial_scale=0.5).apply)({}, feats, boxes)
    np.testing.assert_allclose(out, jnp.moveaxis(nhwc, -1, -3), atol=1e-6)


@pytest.mark.parametrize("name, dtype, given, expect", [
    ("RoIAlign", None, np.float32, np.float32),
    ("RoIAlign", None, np.float64, np.float64),
    ("RoIAlign", None, jnp.bfloat16, jnp.bfloat16),
    ("RoIAlign", jnp.bfloat16, np.float32, jnp.bfloat16),
    ("RoIAlign", jnp.float16, np.float32, jnp.float16),
    ("RoIAlign", jnp.float32, np.float64, jnp.float32),
    ("RoIPool", jnp.bfloat16, np.float32, jnp.bfloat16),
    ("RoIPool", None, np.float64, np.float64),
    ("MultiScaleRoIAlign", jnp.float32, jnp.bfloat16, jnp.float32),
    ("MultiScaleRoIAlign", None, jnp.float16, jnp.float16),
])
def test_dtype(name, dtype, given, expect):
    """dtype is the computation/output dtype: features are cast to it; None keeps theirs."""
    module_cls, fn, kw, make = CASES[name]
    feats, boxes = _inputs(given)
    out = jax.jit(module_cls(2, dtype=dtype, **kw))(make(feats), boxes)
    assert out.dtype == jnp.dtype(expect)
    cast = feats if dtype is None else feats.astype(dtype)
    np.testing.assert_array_equal(out, jax.jit(lambda x, b: fn(x, b, 2, **kw))(make(cast), boxes))


def test_nn_jit():
    feats, boxes = _inputs()
    jitted = nn.jit(L.RoIAlign)(3, spatial_scale=0.5, sampling_ratio=2)
    out = jitted.apply({}, feats, boxes)
    expect = jax.jit(lambda f, b: jax_roi.roi_align(f, b, 3, spatial_scale=0.5, sampling_ratio=2))(feats, boxes)
    np.testing.assert_allclose(out, expect, atol=1e-6)
    levels = _levels(feats)
    jitted = nn.jit(L.MultiScaleRoIAlign)(2, spatial_scales=SCALES, sampling_ratio=2, canonical_scale=8,
                                          canonical_level=2)
    expect = jax.jit(lambda lv, b: jax_roi.multiscale_roi_align(lv, b, 2, spatial_scales=SCALES, sampling_ratio=2,
                                                                canonical_scale=8, canonical_level=2))(levels, boxes)
    np.testing.assert_allclose(jitted.apply({}, levels, boxes), expect, atol=1e-6)


class BoxHead(nn.Module):
    """The docstring's box head, with an optional remat of the pooling."""

    num_classes: int = 3
    remat: bool = False

    @nn.compact
    def __call__(self, features, boxes):
        pool_cls = nn.remat(L.RoIAlign) if self.remat else L.RoIAlign
        x = pool_cls(3, spatial_scale=1 / 2, sampling_ratio=2)(features, boxes)   # [B, R, 3, 3, C]
        x = nn.relu(nn.Dense(16)(x.reshape(x.shape[:-3] + (-1,))))
        scores, deltas = nn.Dense(self.num_classes)(x), nn.Dense(4 * self.num_classes)(x)
        return scores, deltas


def test_box_head_and_grad():
    """As a submodule: params only from the Dense layers; gradients to params, features and
    boxes; nn.remat of the pooling gives the same numbers."""
    feats, boxes = _inputs()
    head = BoxHead()
    params = jax.jit(head.init)(jax.random.key(0), feats, boxes)
    assert set(params["params"]) == {"Dense_0", "Dense_1", "Dense_2"}
    scores, deltas = jax.jit(head.apply)(params, feats, boxes)
    assert scores.shape == (2, 3, 3) and deltas.shape == (2, 3, 12)

    def loss(params, feats, boxes, remat=False):
        scores, deltas = BoxHead(remat=remat).apply(params, feats, boxes)
        return jnp.sum(scores ** 2) + jnp.sum(deltas ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, feats, boxes)
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.abs(np.asarray(grads[1])).max() > 0 and np.abs(np.asarray(grads[2])).max() > 0
    remat = jax.jit(jax.grad(lambda *a: loss(*a, remat=True), argnums=(0, 1, 2)))(params, feats, boxes)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grad_equals_function_grad():
    feats, boxes = _inputs(np.float64)
    boxes = boxes.astype(jnp.float64)
    module = L.RoIAlign(2, spatial_scale=0.5, sampling_ratio=-1)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 2, 2, 3)))
    g_mod = jax.jit(jax.grad(lambda f, b: jnp.sum(module.apply({}, f, b) * cot), argnums=(0, 1)))(feats, boxes)
    g_fn = jax.jit(jax.grad(lambda f, b: jnp.sum(jax_roi.roi_align(f, b, 2, spatial_scale=0.5) * cot),
                            argnums=(0, 1)))(feats, boxes)
    for a, b in zip(g_mod, g_fn):
        if jax.default_backend() == "gpu":  # two runs of an atomic (order-dependent) backward
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_array_equal(a, b)


class ScanCell(nn.Module):
    """One step: pool this step's boxes, accumulate their mean feature."""

    @nn.compact
    def __call__(self, carry, features, boxes):
        pooled = L.RoIAlign(2, spatial_scale=0.5, sampling_ratio=2)(features, boxes)
        return carry + pooled.mean(axis=(1, 2, 3)), pooled


def test_nn_scan():
    feats, boxes = _inputs()
    steps = jnp.stack([boxes, boxes + 1.0, boxes * 0.5])  # [T, B, R, 4]
    Scan = nn.scan(ScanCell, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=(nn.broadcast, 0), out_axes=0)
    carry0 = jnp.zeros((2, 3))
    carry, pooled = jax.jit(Scan().apply)({}, carry0, feats, steps)
    pool = jax.jit(lambda b: jax_roi.roi_align(feats, b, 2, spatial_scale=0.5, sampling_ratio=2))
    expect = [pool(b) for b in steps]
    np.testing.assert_allclose(pooled, jnp.stack(expect), atol=1e-6)
    np.testing.assert_allclose(carry, sum(e.mean(axis=(1, 2, 3)) for e in expect), atol=1e-5)


def test_nn_vmap():
    feats, boxes = _inputs()
    VRoI = nn.vmap(L.RoIAlign, in_axes=0, out_axes=0, variable_axes={}, split_rngs={})
    out = jax.jit(VRoI(2, spatial_scale=0.5, sampling_ratio=2).apply)({}, feats, boxes)  # [H, W, C] per image
    expect = jax.jit(lambda f, b: jax_roi.roi_align(f, b, 2, spatial_scale=0.5, sampling_ratio=2))(feats, boxes)
    np.testing.assert_allclose(out, expect, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_implementation_is_passed_through(name):
    module_cls, _, kw, make = CASES[name]
    feats, boxes = _inputs()
    with pytest.raises(ValueError, match="implementation"):
        module_cls(2, implementation="cuda-please", **kw)(make(feats), boxes)


def test_bad_arguments_raise_the_functions_errors():
    feats, boxes = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        L.RoIAlign(2, reduction="sum")(feats, boxes)
    with pytest.raises(ValueError, match="binning"):
        L.RoIPool(2, binning="round")(feats, boxes)
    with pytest.raises(ValueError, match="one scale per level"):
        L.MultiScaleRoIAlign(2, spatial_scales=(0.5,))(_levels(feats), boxes)


def _rotated_inputs(dtype=np.float32, seed=2):
    """Features and ``[B, R, 5]`` oriented boxes ``(x_ctr, y_ctr, w, h, angle)``, any angle."""
    rng = np.random.default_rng(seed)
    feats = jnp.asarray(rng.standard_normal((2, 8, 10, 3)), dtype)
    centre = rng.uniform(2, 18, (2, 3, 2))
    size = rng.uniform(3, 10, (2, 3, 2))
    angle = rng.uniform(-180, 180, (2, 3, 1))
    return feats, jnp.asarray(np.concatenate([centre, size, angle], -1), jnp.float32)


def test_roi_align_rotated_equals_function_jit_and_rois_form():
    kw = dict(spatial_scale=0.5, sampling_ratio=2, aligned=False)
    feats, boxes = _rotated_inputs()
    module = L.RoIAlignRotated((2, 3), **kw)
    variables = jax.eval_shape(module.init, jax.random.key(0), feats, boxes)
    assert jax.tree_util.tree_leaves(variables) == []
    out = jax.jit(module.apply)(variables, feats, boxes)
    expect = jax.jit(lambda x, b: jax_roi.roi_align_rotated(x, b, (2, 3), **kw))(feats, boxes)
    assert out.shape == (2, 3, 2, 3, 3) and out.dtype == jnp.float32
    assert float(jnp.abs(expect).max()) > 0.1  # the boxes do read the map
    np.testing.assert_array_equal(out, expect)
    rois = jnp.concatenate([jnp.repeat(jnp.arange(2.0), 3)[:, None], boxes.reshape(6, 5)], axis=1)
    out_rois = jax.jit(lambda x, r: L.RoIAlignRotated([2, 3], **kw)(x, r))(feats, rois)
    np.testing.assert_allclose(out_rois, expect.reshape(out_rois.shape), atol=2e-6)
    jitted = nn.jit(L.RoIAlignRotated)((2, 3), **kw)
    np.testing.assert_allclose(jitted.apply({}, feats, boxes), expect, atol=1e-6)


@pytest.mark.parametrize("dtype, given, expect", [(None, np.float64, np.float64), (jnp.bfloat16, np.float32, jnp.bfloat16),
                                                  (jnp.float32, jnp.bfloat16, jnp.float32)])
def test_roi_align_rotated_dtype(dtype, given, expect):
    feats, boxes = _rotated_inputs(given)
    out = jax.jit(L.RoIAlignRotated(2, sampling_ratio=2, dtype=dtype))(feats, boxes)
    assert out.dtype == jnp.dtype(expect)
    cast = feats if dtype is None else feats.astype(dtype)
    np.testing.assert_array_equal(out, jax.jit(lambda x, b: jax_roi.roi_align_rotated(x, b, 2, sampling_ratio=2))(
        cast, boxes))


def test_roi_align_rotated_grad_equals_function_grad():
    """float64: the gradients in the features and in all five box numbers (the angle too)."""
    feats, boxes = _rotated_inputs(np.float64)
    boxes = boxes.astype(jnp.float64)
    module = L.RoIAlignRotated(2, spatial_scale=0.5, sampling_ratio=1)  # one sample a bin: the quickest backward to compile
    cot = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 2, 2, 3)))
    grads = jax.jit(lambda f, b: (  # one program: its two halves are the same computation, compiled once
        jax.grad(lambda f, b: jnp.sum(module.apply({}, f, b) * cot), argnums=(0, 1))(f, b),
        jax.grad(lambda f, b: jnp.sum(jax_roi.roi_align_rotated(f, b, 2, spatial_scale=0.5, sampling_ratio=1) * cot),
                 argnums=(0, 1))(f, b)))
    g_mod, g_fn = grads(feats, boxes)
    assert np.abs(np.asarray(g_fn[1][..., 4])).max() > 1e-3  # the angle's derivative is there
    for a, b in zip(g_mod, g_fn):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="implementation"):
        L.RoIAlignRotated(2, implementation="cuda-please")(feats, boxes)
