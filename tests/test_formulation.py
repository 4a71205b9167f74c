"""The public ``formulation`` option (jax_roi/xla/formulation.py): both formulations of the
pure-JAX path agree on values and gradients through the public ops, the default is the
gather form on CPU and the dense form when lowered for TPU (no gather and no scatter,
forward and backward, through the public API's own argument handling), and the option's
errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_rois

import jax_roi

SCALES = [0.5, 0.25]
SIZE = (3, 2)

# (name, op(features, boxes, **kw)): every op with a matmul form, on one or two levels.
OPS = {
    "align-fixed": lambda f, b, **kw: jax_roi.roi_align(f[0], b, SIZE, spatial_scale=0.5, sampling_ratio=2, **kw),
    "align-adaptive": lambda f, b, **kw: jax_roi.roi_align(f[0], b, SIZE, spatial_scale=0.5, sampling_ratio=-1,
                                                           aligned=False, **kw),
    "warp": lambda f, b, **kw: jax_roi.roi_warp(f[0], b, SIZE, spatial_scale=0.5, sampling_ratio=2, **kw),
    "multiscale": lambda f, b, **kw: jax_roi.multiscale_roi_align(f, b, SIZE, spatial_scales=SCALES,
                                                                  sampling_ratio=-1, canonical_scale=8,
                                                                  canonical_level=1, **kw),
}


def _inputs(seed, dtype=np.float64, per_image=False):
    rng = np.random.default_rng(seed)
    levels = [jnp.asarray(rng.standard_normal((2, h, w, 3)), dtype) for h, w in ((8, 10), (4, 5))]
    if per_image:
        boxes = np.stack([random_rois(rng, 1, 8, 10, 5, scale=0.5, edge=False)[:, 1:] for _ in range(2)])
    else:
        boxes = random_rois(rng, 2, 8, 10, 9, scale=0.5)
    return levels, jnp.asarray(boxes, dtype)


def _loss(op, **kw):
    def loss(levels, boxes):
        out = op(levels, boxes, implementation="xla", **kw)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))
    return loss


@pytest.mark.parametrize("per_image", [False, True], ids=["rois", "per_image"])
@pytest.mark.parametrize("name", list(OPS))
def test_formulations_agree(name, per_image):
    """Values and gradients (features and boxes) of ``"matmul"``, ``"gather"`` and the
    default, to float64 rounding, edge boxes included."""
    levels, boxes = _inputs(1, per_image=per_image)
    op = OPS[name]
    results = {}
    for formulation in ("gather", "matmul", None):
        fn = jax.jit(functools.partial(op, implementation="xla", formulation=formulation))
        grads = jax.jit(jax.grad(_loss(op, formulation=formulation), argnums=(0, 1)))(levels, boxes)
        results[formulation] = (fn(levels, boxes), grads)
    want = results["gather"]
    assert float(jnp.max(jnp.abs(want[0]))) > 0.1  # real values, not zeros
    for formulation in ("matmul", None):
        for got, ref in zip(jax.tree.leaves(results[formulation]), jax.tree.leaves(want)):
            np.testing.assert_allclose(got, ref, atol=1e-10, rtol=1e-10)


def test_matmul_float32_and_kernels_agree():
    """float32, against the default path of the platform (the kernels where built)."""
    levels, boxes = _inputs(2, dtype=np.float32)
    for op in OPS.values():
        got = jax.jit(functools.partial(op, implementation="xla", formulation="matmul"))(levels, boxes)
        want = jax.jit(op)(levels, boxes)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _lowered(fn, levels, boxes, platform):
    return jax.jit(fn).trace(levels, boxes).lower(lowering_platforms=(platform,)).as_text().lower()


GATHERS = ("gather", "scatter", "dynamic_slice", "dynamic_update_slice")


@pytest.mark.parametrize("per_image", [False, True], ids=["rois", "per_image"])
@pytest.mark.parametrize("name", list(OPS))
def test_tpu_default_has_no_gather_or_scatter(name, per_image):
    """The default formulation lowered for TPU: forward, and the gradient in the features
    and the boxes, with no gather, scatter or data-indexed slice anywhere in the module
    (the public API's canonicalisation and the FPN level rule included)."""
    levels, boxes = _inputs(3, dtype=np.float32, per_image=per_image)
    op = OPS[name]

    def forward(levels, boxes):
        return op(levels, boxes, implementation="xla")

    backward = jax.grad(_loss(op), argnums=(0, 1))
    for fn in (forward, backward):
        text = _lowered(fn, levels, boxes, "tpu")
        for word in GATHERS:
            assert word not in text, f"{word} in the TPU lowering of {name}"
        assert "dot_general" in text
        # The same function lowered for CPU takes the gather form: the check can see it.
        cpu = _lowered(fn, levels, boxes, "cpu")
        assert any(word in cpu for word in GATHERS)


def test_max_and_roi_pool_keep_gathers_on_tpu():
    """Documented: the max reduction and RoIPool have no dense form."""
    levels, boxes = _inputs(4, dtype=np.float32)
    for fn in (lambda f, b: jax_roi.roi_align(f[0], b, SIZE, sampling_ratio=2, reduction="max", implementation="xla"),
               lambda f, b: jax_roi.roi_pool(f[0], b, SIZE, implementation="xla")):
        assert "gather" in _lowered(fn, levels, boxes, "tpu")


def test_named_formulation_selects_pure_jax():
    """``implementation=None`` with a formulation named runs the pure-JAX path (no kernel
    custom call), with the kernels' values."""
    levels, boxes = _inputs(5, dtype=np.float32)
    op = OPS["align-fixed"]
    text = jax.jit(functools.partial(op, formulation="gather")).lower(levels, boxes).as_text()
    assert "jax_roi_" not in text
    np.testing.assert_allclose(jax.jit(functools.partial(op, formulation="gather"))(levels, boxes),
                               jax.jit(op)(levels, boxes), atol=1e-5, rtol=1e-5)


def test_errors_name_the_argument():
    levels, boxes = _inputs(6, dtype=np.float32)
    f = levels[0]
    with pytest.raises(ValueError, match=r"formulation: expected one of None, 'gather', 'matmul', got 'dense'"):
        jax_roi.roi_align(f, boxes, SIZE, formulation="dense")
    with pytest.raises(ValueError, match=r"formulation: expected 'gather' or None with reduction='max'.*got 'matmul'"):
        jax_roi.roi_align(f, boxes, SIZE, reduction="max", formulation="matmul")
    if "cpu" in jax_roi.ffi.platforms():
        with pytest.raises(ValueError, match=r"formulation: expected None with implementation='ffi'.*got 'matmul'"):
            jax_roi.roi_align(f, boxes, SIZE, implementation="ffi", formulation="matmul")
