"""jax_roi.nnx: stateless flax.nnx wrappers that equal the functions, under nnx.jit,
nnx.remat, nnx.scan, nnx.grad and jax.grad, with Flax's dtype convention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_roi
from jax_roi import nnx as N

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


CASES = {
    "RoIAlign": (N.RoIAlign, jax_roi.roi_align,
                 dict(spatial_scale=0.5, sampling_ratio=2, aligned=False, reduction="max"), lambda f: f),
    "RoIWarp": (N.RoIWarp, jax_roi.roi_warp, dict(spatial_scale=0.5, sampling_ratio=-1), lambda f: f),
    "RoIPool": (N.RoIPool, jax_roi.roi_pool, dict(spatial_scale=0.5, binning="floor"), lambda f: f),
    "MultiScaleRoIAlign": (N.MultiScaleRoIAlign, jax_roi.multiscale_roi_align,
                           dict(spatial_scales=list(SCALES), sampling_ratio=2, canonical_scale=8,
                                canonical_level=2), _levels),
}


def _call(module, x, b):
    return module(x, b)


@pytest.mark.parametrize("name", list(CASES))
def test_equals_function_and_has_no_state(name):
    implementation = None  # the default (fastest built) path; the paths themselves are tested with the functions
    module_cls, fn, kw, make = CASES[name]
    feats, boxes = _inputs()
    x = make(feats)
    module = module_cls((2, 3), implementation=implementation, **kw)
    assert jax.tree_util.tree_leaves(nnx.state(module)) == []
    out = nnx.jit(_call)(module, x, boxes)
    expect = jax.jit(lambda x, b: fn(x, b, (2, 3), implementation=implementation, **kw))(x, boxes)
    assert out.shape == (2, 3, 2, 3, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, expect)
    rois = jnp.concatenate([jnp.repeat(jnp.arange(2.0), 3)[:, None], boxes.reshape(6, 4)], axis=1)
    out_rois = jax.jit(lambda x, r: module_cls([2, 3], implementation=implementation, **kw)(x, r))(x, rois)
    np.testing.assert_allclose(out_rois, expect.reshape(out_rois.shape), atol=2e-6)


@pytest.mark.parametrize("name, dtype, given, expect", [
    ("RoIAlign", None, np.float32, np.float32),
    ("RoIAlign", None, np.float64, np.float64),
    ("RoIAlign", None, jnp.bfloat16, jnp.bfloat16),
    ("RoIAlign", jnp.bfloat16, np.float32, jnp.bfloat16),
    ("RoIAlign", jnp.float16, np.float32, jnp.float16),
    ("RoIAlign", jnp.float32, np.float64, jnp.float32),
    ("RoIPool", jnp.bfloat16, np.float32, jnp.bfloat16),
    ("MultiScaleRoIAlign", jnp.float32, jnp.bfloat16, jnp.float32),
    ("MultiScaleRoIAlign", None, jnp.float16, jnp.float16),
])
def test_dtype(name, dtype, given, expect):
    """dtype is the computation/output dtype: features are cast to it; None keeps theirs."""
    module_cls, fn, kw, make = CASES[name]
    feats, boxes = _inputs(given)
    out = nnx.jit(_call)(module_cls(2, dtype=dtype, **kw), make(feats), boxes)
    assert out.dtype == jnp.dtype(expect)
    cast = feats if dtype is None else feats.astype(dtype)
    np.testing.assert_array_equal(out, jax.jit(lambda x, b: fn(x, b, 2, **kw))(make(cast), boxes))


class BoxHead(nnx.Module):
    """The docstring's box head."""

    def __init__(self, channels, num_classes, *, rngs, remat=False):
        self.pool = N.RoIAlign(3, spatial_scale=1 / 2, sampling_ratio=2)
        self.fc = nnx.Linear(3 * 3 * channels, 16, rngs=rngs)
        self.cls = nnx.Linear(16, num_classes, rngs=rngs)
        self.box = nnx.Linear(16, 4 * num_classes, rngs=rngs)
        self.remat = remat

    def __call__(self, features, boxes):
        pool = nnx.remat(_call) if self.remat else _call
        x = pool(self.pool, features, boxes)                       # [B, R, 3, 3, C]
        x = nnx.relu(self.fc(x.reshape(x.shape[:-3] + (-1,))))
        return self.cls(x), self.box(x)


def _loss(head, feats, boxes):
    scores, deltas = head(feats, boxes)
    return jnp.sum(scores ** 2) + jnp.sum(deltas ** 2)


def test_box_head_nnx_grad_and_remat():
    feats, boxes = _inputs()
    head = BoxHead(3, 3, rngs=nnx.Rngs(0))
    params = nnx.state(head, nnx.Param)
    assert set(params.keys()) == {"fc", "cls", "box"}
    scores, deltas = nnx.jit(_call)(head, feats, boxes)
    assert scores.shape == (2, 3, 3) and deltas.shape == (2, 3, 12)
    grads = nnx.jit(nnx.grad(_loss))(head, feats, boxes)
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))
    # features and boxes gradients through the module, with and without remat
    d_fb = nnx.jit(nnx.grad(_loss, argnums=(1, 2)))(head, feats, boxes)
    assert np.abs(np.asarray(d_fb[0])).max() > 0 and np.abs(np.asarray(d_fb[1])).max() > 0
    head.remat = True
    grads_r = nnx.jit(nnx.grad(_loss))(head, feats, boxes)
    d_fb_r = nnx.jit(nnx.grad(_loss, argnums=(1, 2)))(head, feats, boxes)
    for a, b in zip(jax.tree_util.tree_leaves((grads, d_fb)), jax.tree_util.tree_leaves((grads_r, d_fb_r))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_training_step_with_optimizer():
    import optax

    feats, boxes = _inputs()
    head = BoxHead(3, 3, rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(head, optax.sgd(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(head, opt, feats, boxes):
        loss, grads = nnx.value_and_grad(_loss)(head, feats, boxes)
        opt.update(head, grads)
        return loss

    losses = [float(step(head, opt, feats, boxes)) for _ in range(3)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_jax_grad_equals_function_grad():
    feats, boxes = _inputs(np.float64)
    boxes = boxes.astype(jnp.float64)
    module = N.RoIAlign(2, spatial_scale=0.5, sampling_ratio=-1)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 2, 2, 3)))
    g_mod = jax.jit(jax.grad(lambda f, b: jnp.sum(module(f, b) * cot), argnums=(0, 1)))(feats, boxes)
    g_fn = jax.jit(jax.grad(lambda f, b: jnp.sum(jax_roi.roi_align(f, b, 2, spatial_scale=0.5) * cot),
                            argnums=(0, 1)))(feats, boxes)
    for a, b in zip(g_mod, g_fn):
        if jax.default_backend() == "gpu":  # two runs of an atomic (order-dependent) backward
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_array_equal(a, b)


def test_nnx_scan():
    feats, boxes = _inputs()
    steps = jnp.stack([boxes, boxes + 1.0, boxes * 0.5])  # [T, B, R, 4]
    module = N.RoIAlign(2, spatial_scale=0.5, sampling_ratio=2)

    @nnx.scan(in_axes=(None, nnx.Carry, None, 0), out_axes=(nnx.Carry, 0))
    def body(module, carry, features, boxes):
        pooled = module(features, boxes)
        return carry + pooled.mean(axis=(1, 2, 3)), pooled

    carry, pooled = nnx.jit(body)(module, jnp.zeros((2, 3)), feats, steps)
    pool = jax.jit(lambda b: jax_roi.roi_align(feats, b, 2, spatial_scale=0.5, sampling_ratio=2))
    expect = [pool(b) for b in steps]
    np.testing.assert_allclose(pooled, jnp.stack(expect), atol=1e-6)
    np.testing.assert_allclose(carry, sum(e.mean(axis=(1, 2, 3)) for e in expect), atol=1e-5)


def test_nnx_vmap():
    feats, boxes = _inputs()
    module = N.MultiScaleRoIAlign(2, spatial_scales=SCALES, sampling_ratio=2, canonical_scale=8, canonical_level=2)
    out = nnx.jit(nnx.vmap(_call, in_axes=(None, 0, 0)))(module, _levels(feats), boxes)  # [H, W, C] levels per image
    expect = jax.jit(lambda lv, b: jax_roi.multiscale_roi_align(
        lv, b, 2, spatial_scales=SCALES, sampling_ratio=2, canonical_scale=8, canonical_level=2))(_levels(feats), boxes)
    np.testing.assert_allclose(out, expect, atol=1e-6)


def test_split_merge_roundtrip():
    """graphdef / state round trip (what nnx transforms do): attributes are static."""
    module = N.MultiScaleRoIAlign((2, 3), spatial_scales=[0.5, 0.25], sampling_ratio=2, dtype=jnp.bfloat16)
    graphdef, state = nnx.split(module)
    again = nnx.merge(graphdef, state)
    assert again.spatial_scales == (0.5, 0.25) and again.output_size == (2, 3) and again.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", list(CASES))
def test_implementation_is_passed_through(name):
    module_cls, _, kw, make = CASES[name]
    feats, boxes = _inputs()
    with pytest.raises(ValueError, match="implementation"):
        module_cls(2, implementation="cuda-please", **kw)(make(feats), boxes)


def test_bad_arguments_raise_the_functions_errors():
    feats, boxes = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        N.RoIAlign(2, reduction="sum")(feats, boxes)
    with pytest.raises(ValueError, match="binning"):
        N.RoIPool(2, binning="round")(feats, boxes)
    with pytest.raises(ValueError, match="one scale per level"):
        N.MultiScaleRoIAlign(2, spatial_scales=(0.5,))(_levels(feats), boxes)


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
    module = N.RoIAlignRotated((2, 3), **kw)
    assert jax.tree_util.tree_leaves(nnx.state(module)) == []
    out = nnx.jit(_call)(module, feats, boxes)
    expect = jax.jit(lambda x, b: jax_roi.roi_align_rotated(x, b, (2, 3), **kw))(feats, boxes)
    assert out.shape == (2, 3, 2, 3, 3) and out.dtype == jnp.float32
    assert float(jnp.abs(expect).max()) > 0.1  # the boxes do read the map
    np.testing.assert_array_equal(out, expect)
    rois = jnp.concatenate([jnp.repeat(jnp.arange(2.0), 3)[:, None], boxes.reshape(6, 5)], axis=1)
    out_rois = jax.jit(lambda x, r: N.RoIAlignRotated([2, 3], **kw)(x, r))(feats, rois)
    np.testing.assert_allclose(out_rois, expect.reshape(out_rois.shape), atol=2e-6)


@pytest.mark.parametrize("dtype, given, expect", [(None, np.float64, np.float64), (jnp.bfloat16, np.float32, jnp.bfloat16),
                                                  (jnp.float32, jnp.bfloat16, jnp.float32)])
def test_roi_align_rotated_dtype(dtype, given, expect):
    feats, boxes = _rotated_inputs(given)
    out = nnx.jit(_call)(N.RoIAlignRotated(2, sampling_ratio=2, dtype=dtype), feats, boxes)
    assert out.dtype == jnp.dtype(expect)
    cast = feats if dtype is None else feats.astype(dtype)
    np.testing.assert_array_equal(out, jax.jit(lambda x, b: jax_roi.roi_align_rotated(x, b, 2, sampling_ratio=2))(
        cast, boxes))


def test_roi_align_rotated_grad_equals_function_grad():
    """float64, through nnx.grad: the gradients in the features and in all five box numbers
    (the angle too)."""
    feats, boxes = _rotated_inputs(np.float64)
    boxes = boxes.astype(jnp.float64)
    module = N.RoIAlignRotated(2, spatial_scale=0.5, sampling_ratio=1)  # one sample a bin: the quickest backward to compile
    cot = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 2, 2, 3)))
    grads = nnx.jit(lambda m, f, b: (  # one program: its two halves are the same computation, compiled once
        nnx.grad(lambda m, f, b: jnp.sum(m(f, b) * cot), argnums=(1, 2))(m, f, b),
        jax.grad(lambda f, b: jnp.sum(jax_roi.roi_align_rotated(f, b, 2, spatial_scale=0.5, sampling_ratio=1) * cot),
                 argnums=(0, 1))(f, b)))
    g_mod, g_fn = grads(module, feats, boxes)
    assert np.abs(np.asarray(g_fn[1][..., 4])).max() > 1e-3  # the angle's derivative is there
    for a, b in zip(g_mod, g_fn):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="implementation"):
        N.RoIAlignRotated(2, implementation="cuda-please")(feats, boxes)
