"""roi_align_rotated (detectron2's ROIAlignRotated): the float64 oracle (tests/reference.py,
written from detectron2's definition) on random angles and the edge boxes, torchvision's
roi_align golden data at angle 0, the 90- and 180-degree identities on a transposed or
flipped grid, feature and box gradients (all five numbers, by central differences), the box
forms, layouts and transforms, absurd boxes and the argument errors."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roi
import reference as R
from conftest import BOUNDED_TIME_S, timed_forward_backward, TOLERANCE, output_and_feature_gradient
from jax_roi import ffi

# The pure-JAX path, named explicitly (implementation=None picks the kernels where built).
xla_rotated = functools.partial(jax_roi.roi_align_rotated, implementation="xla")
HAS_KERNELS = "cpu" in ffi.platforms()
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="the FFI CPU kernels are not built")


def rotated_rois(rng, num_images, height, width, count, *, scale=1.0, edge=True):
    """``[count + edge cases, 6]`` rois ``(batch, x_ctr, y_ctr, w, h, angle)`` in image
    pixels: centres on, near and off the map, sizes from sub-pixel to most of the map, any
    angle; with ``edge``: zero-size, negative-size, padding (-1), out-of-batch, NaN and inf
    boxes (the last four give zeros)."""
    img_h, img_w = height / scale, width / scale
    cx = rng.uniform(-0.2 * img_w, 1.2 * img_w, count)
    cy = rng.uniform(-0.2 * img_h, 1.2 * img_h, count)
    w = rng.uniform(0.3, 0.9 * img_w, count)
    h = rng.uniform(0.3, 0.9 * img_h, count)
    angle = rng.uniform(-180, 180, count)
    b = rng.integers(0, num_images, count)
    rois = np.stack([b, cx, cy, w, h, angle], 1)
    if edge:
        c = (img_w / 2, img_h / 2)
        rois = np.concatenate([rois, np.array([
            [0, *c, 0.0, 0.0, 30.0],            # empty
            [1 % num_images, *c, -3.0, 2.0, 45.0],  # negative width
            [-1, *c, 4.0, 4.0, 10.0],           # padding
            [num_images, *c, 4.0, 4.0, 10.0],   # out of the batch
            [0, np.nan, c[1], 4.0, 4.0, 0.0],   # NaN
            [0, *c, 4.0, 4.0, np.inf],          # inf angle
        ])])
    return rois


DEAD = slice(-4, None)  # the padding, out-of-batch, NaN and inf rows of rotated_rois


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio, scale", [(2, 1.0), (0, 1.0), (3, 0.5), (-1, 0.5)])
def test_matches_oracle(aligned, sampling_ratio, scale):
    """float64, 1e-10: outputs and feature gradients against the oracle, dead rows zero."""
    rng = np.random.default_rng(31)
    feats = rng.standard_normal((2, 9, 11, 3))
    rois = rotated_rois(rng, 2, 9, 11, 14, scale=scale)
    kw = dict(spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)
    cot = rng.standard_normal((rois.shape[0], 3, 4, 3))
    fn = jax.jit(lambda f, r: xla_rotated(f, r, (3, 4), **kw))
    out, pullback = jax.vjp(lambda f: fn(f, jnp.asarray(rois)), jnp.asarray(feats))
    np.testing.assert_allclose(np.asarray(out), R.roi_align_rotated_ref(feats, rois, (3, 4), **kw), atol=1e-10)
    np.testing.assert_array_equal(np.asarray(out)[DEAD], 0)
    np.testing.assert_allclose(np.asarray(pullback(jnp.asarray(cot))[0]),
                               R.roi_align_rotated_ref_vjp(feats, rois, (3, 4), cot, **kw), atol=1e-10)


def test_boxes_with_more_samples_than_any_window():
    """Adaptive bins with more samples per side (up to 70) than the largest window the loops
    visit: only the samples that can land on the map are visited, and nothing is lost."""
    rng = np.random.default_rng(32)
    feats = rng.standard_normal((1, 6, 7, 2))
    rois = np.array([[0, 3.0, 2.5, 210.0, 9.0, 20.0], [0, 4.0, 3.0, 140.0, 150.0, -65.0],
                     [0, -30.0, 3.0, 80.0, 3.0, 0.0]])
    out = xla_rotated(jnp.asarray(feats), rois, 3, sampling_ratio=0)
    np.testing.assert_allclose(np.asarray(out), R.roi_align_rotated_ref(feats, rois, 3, sampling_ratio=0),
                               atol=1e-12)
    assert np.abs(np.asarray(out)).max() > 1e-3  # samples did land on the map


def _corner_form(rois):
    """``[K, 5]`` corner rois -> ``[K, 6]`` rotated rois at angle 0."""
    b, x1, y1, x2, y2 = rois.T
    return np.stack([b, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, np.zeros_like(b)], 1)


# Aligned and legacy, fixed and adaptive, both scales and both grids, in four compiles.
_GOLDEN_TAGS = ("align_s1_sr2_al1_o3x3", "align_s1_sr2_al0_o3x3", "align_s0p5_srm1_al1_o2x4",
                "align_s0p5_srm1_al0_o2x4")


@pytest.mark.parametrize("tag", _GOLDEN_TAGS)
def test_angle_zero_is_torchvision_roi_align(golden_data, tag):
    """float32, 1e-5: at angle 0 the op is torchvision's roi_align (its golden outputs and
    feature gradients). Legacy boxes under one pixel differ by definition (detectron2
    centres the one-pixel box, torchvision starts it at x1) and are left out, with the rows
    torchvision raised on; the gradient is then that of the kept rows (the oracle's)."""
    _check_torchvision_golden(golden_data, tag, "xla")


def _check_torchvision_golden(golden_data, tag, implementation):
    g = golden_data
    i = [str(t) for t in g["align_tags"]].index(tag)
    s, sr, al, oh, ow = g["align_params"][i]
    rois = g["align_rois"].astype(np.float64)
    rotated = _corner_form(rois)
    keep = ~g[f"{tag}_tvfail"]
    if not al:
        keep &= (rotated[:, 3] * s >= 1) & (rotated[:, 4] * s >= 1)
    assert keep.sum() >= 15
    cot = np.where(keep[:, None, None, None], g[f"{tag}_cot_nhwc"], 0).astype(np.float32)
    feats = jnp.asarray(g["align_features_nhwc"], jnp.float32)
    out, d_f = output_and_feature_gradient(
        lambda f: jax_roi.roi_align_rotated(f, jnp.asarray(rotated, jnp.float32), (int(oh), int(ow)),
                                            spatial_scale=float(s), sampling_ratio=int(sr), aligned=bool(al),
                                            implementation=implementation),
        feats, cot)
    np.testing.assert_allclose(np.asarray(out)[keep], g[f"{tag}_out_nhwc"][keep], atol=1e-5)
    if keep.all():
        np.testing.assert_allclose(np.asarray(d_f), g[f"{tag}_dfeat_nhwc"], atol=1e-5)
    else:
        expect = R.roi_align_ref_vjp(np.asarray(feats), rois[keep], (int(oh), int(ow)), cot[keep],
                                     spatial_scale=float(s), sampling_ratio=int(sr), aligned=bool(al))[0]
        np.testing.assert_allclose(np.asarray(d_f), expect, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_quarter_turn_is_the_transposed_map(sampling_ratio):
    """At 90 degrees, sample ``(yy, xx)`` lands at ``(c_y - xx, c_x + yy)``: the same box at
    angle 0 on the spatially transposed map, centre swapped, with its bin columns reversed."""
    rng = np.random.default_rng(33)
    feats = rng.standard_normal((2, 8, 11, 3))
    rois = rotated_rois(rng, 2, 8, 11, 10, edge=False)
    turned = rois.copy()
    turned[:, 5] = 90.0
    upright = rois.copy()
    upright[:, 1], upright[:, 2], upright[:, 5] = rois[:, 2], rois[:, 1], 0.0
    kw = dict(sampling_ratio=sampling_ratio)
    a = xla_rotated(jnp.asarray(feats), turned, (3, 4), **kw)
    b = xla_rotated(jnp.asarray(feats.transpose(0, 2, 1, 3)), upright, (3, 4), **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b)[:, :, ::-1], atol=1e-10)


def test_half_turn_is_the_flipped_grid():
    """Adding 180 degrees reflects every sample through the centre: the output's bins in
    reverse order on both axes."""
    rng = np.random.default_rng(34)
    feats = jnp.asarray(rng.standard_normal((2, 8, 11, 3)))
    rois = rotated_rois(rng, 2, 8, 11, 10, edge=False)
    half = rois.copy()
    half[:, 5] += 180.0
    for sr in (2, 0):
        a = xla_rotated(feats, rois, (3, 4), sampling_ratio=sr)
        b = xla_rotated(feats, half, (3, 4), sampling_ratio=sr)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a)[:, ::-1, ::-1], atol=1e-10)


@pytest.mark.parametrize("aligned, sampling_ratio", [(True, 2), (False, 0)])
def test_box_gradient_central_differences(aligned, sampling_ratio):
    """float64: d/d(x_ctr, y_ctr, w, h, angle) of a weighted sum of the output against
    central differences of the oracle (step 1e-6, boxes away from the kinks)."""
    rng = np.random.default_rng(35)
    feats = rng.standard_normal((1, 9, 11, 2))
    rois = rotated_rois(rng, 1, 9, 11, 4, edge=False)
    rois[:, 3:5] = np.maximum(rois[:, 3:5], 2.0)
    kw = dict(sampling_ratio=sampling_ratio, aligned=aligned)
    cot = rng.standard_normal((rois.shape[0], 2, 3, 2))

    def loss_ref(r, k):  # the loss terms of box k, the only ones its numbers move
        return np.sum(R.roi_align_rotated_ref(feats, r[k:k + 1], (2, 3), **kw) * cot[k:k + 1])

    grad = jax.grad(lambda r: jnp.sum(xla_rotated(jnp.asarray(feats), r, (2, 3), **kw) * cot))(
        jnp.asarray(rois))
    eps = 1e-6
    numeric = np.zeros_like(rois)
    for k in range(rois.shape[0]):
        for j in range(1, 6):
            up, down = rois.copy(), rois.copy()
            up[k, j] += eps
            down[k, j] -= eps
            numeric[k, j] = (loss_ref(up, k) - loss_ref(down, k)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad), numeric, atol=1e-5, rtol=1e-5)
    assert np.abs(numeric[:, 5]).max() > 1e-3  # the angle's derivative is exercised


def test_dead_and_absurd_boxes():
    """Dead boxes give zeros and zero gradients; boxes of 1e30 pixels (adaptive: 1e29
    samples per side) give finite values and gradients, in bounded time."""
    rng = np.random.default_rng(36)
    feats = jnp.asarray(rng.standard_normal((2, 6, 7, 2)), jnp.float32)
    rois = np.array([[0, 3, 3, 1e30, 1e30, 30], [1, 3, 3, 1e30, 2, 0], [0, 1e30, 3, 4, 4, 0],
                     [-1, 3, 3, 4, 4, 0], [0, np.inf, 3, 4, 4, 0], [0, 3, 3, 4, 4, np.nan]], np.float32)
    fn = jax.jit(jax.value_and_grad(lambda f, r: jnp.sum(xla_rotated(f, r, 2) ** 2), argnums=(0, 1)))
    start = time.perf_counter()
    value, (d_f, d_r) = fn(feats, jnp.asarray(rois))
    assert time.perf_counter() - start < 300  # (1e29 samples per side would never end)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(d_f))) and np.all(np.isfinite(np.asarray(d_r)))
    out = xla_rotated(feats, rois, 2)
    np.testing.assert_array_equal(np.asarray(out)[3:], 0)
    np.testing.assert_array_equal(np.asarray(d_r)[3:], 0)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (jnp.bfloat16, 3e-2)], ids=["f32", "bf16"])
def test_dtypes(dtype, tol):
    rng = np.random.default_rng(37)
    feats = rng.standard_normal((2, 7, 9, 3))
    rois = rotated_rois(rng, 2, 7, 9, 8)
    out = xla_rotated(jnp.asarray(feats, dtype), rois, 3, sampling_ratio=2)
    assert out.dtype == jnp.dtype(dtype)
    ref = R.roi_align_rotated_ref(np.asarray(jnp.asarray(feats, dtype), np.float64), rois, 3, sampling_ratio=2)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=tol, rtol=tol)


def test_box_forms_layouts_and_transforms():
    """Per-image ``[B, R, 5]`` boxes equal the rois form and NCHW equals NHWC (adaptive);
    vmap over boxes, forward mode (against reverse mode) and the hessian in the angle work
    (fixed sampling)."""
    rng = np.random.default_rng(38)
    feats = jnp.asarray(rng.standard_normal((2, 7, 9, 3)))
    per_image = np.stack([rotated_rois(rng, 1, 7, 9, 4, edge=False)[:, 1:] for _ in range(2)])
    rois = np.concatenate([np.concatenate([np.full((4, 1), i), per_image[i]], 1) for i in range(2)])
    adaptive = jax.jit(lambda f, b: xla_rotated(f, b, 3, sampling_ratio=0))
    a = adaptive(feats, jnp.asarray(per_image))
    b = adaptive(feats, jnp.asarray(rois))
    np.testing.assert_allclose(np.asarray(a).reshape(b.shape), np.asarray(b), atol=1e-12)
    c = xla_rotated(jnp.moveaxis(feats, -1, 1), rois, 3, sampling_ratio=0, data_format="NCHW")
    np.testing.assert_allclose(np.asarray(c), np.moveaxis(np.asarray(b), -1, 1), atol=1e-12)
    fn = jax.jit(lambda f, b: xla_rotated(f, b, 3, sampling_ratio=2))
    b = fn(feats, jnp.asarray(rois))
    v = jax.vmap(fn, in_axes=(None, 0))(feats, jnp.stack([jnp.asarray(rois), jnp.asarray(rois) + 0.5]))
    np.testing.assert_allclose(np.asarray(v[0]), np.asarray(b), atol=1e-12)
    tangent = rng.standard_normal(rois.shape)
    tangent[:, 0] = 0
    _, jvp = jax.jvp(lambda r: fn(feats, r), (jnp.asarray(rois),), (jnp.asarray(tangent),))
    cot = rng.standard_normal(b.shape)
    vjp = jax.grad(lambda r: jnp.sum(fn(feats, r) * cot))(jnp.asarray(rois))
    np.testing.assert_allclose(float(jnp.sum(jvp * cot)), float(jnp.sum(vjp * tangent)), rtol=1e-9)
    hess = jax.hessian(lambda angle: jnp.sum(fn(feats, jnp.asarray(rois).at[:, 5].set(angle)) ** 2))(
        jnp.asarray(rois[:, 5]))
    assert hess.shape == (8, 8) and np.all(np.isfinite(np.asarray(hess)))
    np.testing.assert_allclose(np.asarray(hess), np.asarray(hess).T, atol=1e-8)


def test_argument_errors():
    feats = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match=r"boxes: expected \[K, 6\] rois \(batch_index, x_ctr, y_ctr, w, h, angle\)"):
        jax_roi.roi_align_rotated(feats, jnp.zeros((3, 4)), 2)
    with pytest.raises(ValueError, match="implementation: expected"):
        jax_roi.roi_align_rotated(feats, jnp.zeros((3, 6)), 2, implementation="cuda")
    with pytest.raises(TypeError, match="deterministic: expected a bool"):
        jax_roi.roi_align_rotated(feats, jnp.zeros((3, 6)), 2, deterministic="yes")
    with pytest.raises(ValueError, match="boxes: expected leading axes"):
        jax_roi.roi_align_rotated(jnp.zeros((2, 4, 4, 2)), jnp.zeros((3, 2, 5)), 2)


# ----------------------------------------------------------------------------- the kernels
# implementation="ffi": the CPU kernels (or, with JAX_ROI_EMULATE_CUDA=1, the CUDA kernels'
# code run on the host), against the oracle and the pure-JAX path.

kernel_rotated = functools.partial(jax_roi.roi_align_rotated, implementation="ffi")


def _box_gradients(fn, feats, rois, cot):
    """d/d(features, rois) of <fn(features, rois), cot>."""
    return jax.grad(lambda f, r: jnp.sum((fn(f, r) * cot).astype(jnp.float32 if f.dtype != jnp.float64
                                                                  else jnp.float64)), argnums=(0, 1))(feats, rois)


def _numeric_box_gradient(fn, feats, rois, cot, eps=1e-6):
    """Central differences (float64) of <fn(feats, rois), cot> in the five box numbers."""
    numeric = np.zeros(rois.shape)
    for j in range(1, 6):
        step = np.zeros(rois.shape)
        step[:, j] = eps
        for k in range(rois.shape[0]):  # one box at a time: its numbers move its row only
            one = np.zeros(rois.shape)
            one[k] = step[k]
            up, down = fn(feats, jnp.asarray(rois + one)), fn(feats, jnp.asarray(rois - one))
            numeric[k, j] = float(jnp.sum((up - down) * cot)) / (2 * eps)
    return numeric


@needs_kernels
@pytest.mark.parametrize("aligned, sampling_ratio, scale", [(True, 2, 1.0), (False, 0, 1.0), (True, -1, 0.5),
                                                            (False, 3, 0.5)])
def test_kernels_match_oracle(aligned, sampling_ratio, scale):
    """float64, 1e-10: outputs and feature gradients against the oracle on random angles and
    the edge boxes (dead rows zero, zero box gradients); with fixed sampling the box
    gradients (all five numbers) against the pure-JAX path's (adaptive: the central
    differences below)."""
    rng = np.random.default_rng(41)
    feats = jnp.asarray(rng.standard_normal((2, 9, 11, 3)))
    rois = rotated_rois(rng, 2, 9, 11, 14, scale=scale)
    kw = dict(spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)
    cot = jnp.asarray(rng.standard_normal((rois.shape[0], 3, 4, 3)))
    fn = jax.jit(lambda f, r: kernel_rotated(f, r, (3, 4), **kw))
    out = fn(feats, jnp.asarray(rois))
    np.testing.assert_allclose(np.asarray(out), R.roi_align_rotated_ref(np.asarray(feats), rois, (3, 4), **kw),
                               atol=1e-10)
    np.testing.assert_array_equal(np.asarray(out)[DEAD], 0)
    d_f, d_r = _box_gradients(fn, feats, jnp.asarray(rois), cot)
    np.testing.assert_allclose(np.asarray(d_f), R.roi_align_rotated_ref_vjp(np.asarray(feats), rois, (3, 4),
                                                                            np.asarray(cot), **kw), atol=1e-10)
    np.testing.assert_array_equal(np.asarray(d_r)[DEAD], 0)
    np.testing.assert_array_equal(np.asarray(d_r)[:, 0], 0)
    assert np.abs(np.asarray(d_r)[:, 1:]).max(axis=0).min() > 1e-3  # every number gets a gradient somewhere
    if sampling_ratio > 0:
        _, x_r = _box_gradients(jax.jit(lambda f, r: xla_rotated(f, r, (3, 4), **kw)), feats, jnp.asarray(rois), cot)
        np.testing.assert_allclose(np.asarray(d_r), np.asarray(x_r), atol=1e-9 * max(1.0, float(jnp.abs(x_r).max())))


@needs_kernels
def test_kernels_boxes_with_more_samples_than_any_window():
    """Adaptive bins with up to 70 samples per side, more than the window the kernels visit
    per bin side on this map: the oracle's outputs (1e-12) and feature gradients, box
    gradients against central differences of the kernels' forward."""
    rng = np.random.default_rng(42)
    feats = jnp.asarray(rng.standard_normal((1, 6, 7, 2)))
    # (sizes off multiples of the 3 bins: central differences would straddle a step of ceil(bin))
    rois = np.array([[0, 3.0, 2.5, 211.3, 9.4, 20.0], [0, 4.0, 3.0, 140.6, 150.7, -65.0],
                     [0, -30.0, 3.0, 80.5, 3.3, 0.0]])
    fn = jax.jit(lambda f, r: kernel_rotated(f, r, 3, sampling_ratio=0))
    out = fn(feats, jnp.asarray(rois))
    np.testing.assert_allclose(np.asarray(out), R.roi_align_rotated_ref(np.asarray(feats), rois, 3,
                                                                        sampling_ratio=0), atol=1e-12)
    assert np.abs(np.asarray(out)).max() > 1e-3
    cot = jnp.asarray(rng.standard_normal(out.shape))
    d_f, d_r = _box_gradients(fn, feats, jnp.asarray(rois), cot)
    np.testing.assert_allclose(np.asarray(d_f), R.roi_align_rotated_ref_vjp(np.asarray(feats), rois, 3,
                                                                            np.asarray(cot), sampling_ratio=0),
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(d_r), _numeric_box_gradient(fn, feats, rois, cot), atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float64, np.float32, jnp.bfloat16, np.float16],
                         ids=["f64", "f32", "bf16", "f16"])
def test_kernels_dtypes(dtype):
    """Every feature dtype (16-bit floats accumulated in float32): outputs and feature
    gradients against the oracle of the rounded inputs at the dtype's tolerance, in the
    features' dtype; box gradients, in the rois' dtype, against the float64 kernels' on the
    same rounded inputs."""
    rng = np.random.default_rng(43)
    feats = jnp.asarray(rng.standard_normal((2, 7, 9, 3)), dtype)
    coord = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rois = jnp.asarray(rotated_rois(rng, 2, 7, 9, 8, scale=0.5).astype(coord))
    kw = dict(spatial_scale=0.5, sampling_ratio=-1)
    fn = jax.jit(lambda f, r: kernel_rotated(f, r, (2, 3), **kw))
    out = fn(feats, rois)
    assert out.dtype == jnp.dtype(dtype)
    atol, rtol = TOLERANCE[np.dtype(dtype)]
    feats64, rois64 = np.asarray(feats, np.float64), np.asarray(rois, np.float64)
    np.testing.assert_allclose(np.asarray(out, np.float64), R.roi_align_rotated_ref(feats64, rois64, (2, 3), **kw),
                               atol=atol, rtol=rtol)
    cot = jnp.asarray(rng.standard_normal(out.shape), dtype)
    d_f, d_r = _box_gradients(fn, feats, rois, cot)
    assert d_f.dtype == jnp.dtype(dtype) and d_r.dtype == rois.dtype
    cot64 = np.asarray(cot, np.float64)
    np.testing.assert_allclose(np.asarray(d_f, np.float64),
                               R.roi_align_rotated_ref_vjp(feats64, rois64, (2, 3), cot64, **kw), atol=4 * atol,
                               rtol=rtol)
    _, x_r = _box_gradients(fn, jnp.asarray(feats64), jnp.asarray(rois64), jnp.asarray(cot64))
    box_tol = 1e-12 if np.dtype(dtype) == np.float64 else 2e-4
    np.testing.assert_allclose(np.asarray(d_r, np.float64), np.asarray(x_r), rtol=box_tol,
                               atol=box_tol * max(1.0, float(jnp.abs(x_r).max())))


@needs_kernels
@pytest.mark.parametrize("tag", _GOLDEN_TAGS[::3])
def test_kernels_angle_zero_is_torchvision_roi_align(golden_data, tag):
    """The kernels at angle 0 on torchvision's roi_align golden data (float32, 1e-5)."""
    _check_torchvision_golden(golden_data, tag, "ffi")


@needs_kernels
@pytest.mark.parametrize("aligned, sampling_ratio", [(True, 2), (False, 0)])
def test_kernels_box_gradient_central_differences(aligned, sampling_ratio):
    """float64: the kernels' d/d(x_ctr, y_ctr, w, h, angle) against central differences of
    the oracle (step 1e-6, boxes away from the kinks)."""
    rng = np.random.default_rng(35)  # the pure-JAX test's boxes: away from the kinks of ceil(bin)
    feats = rng.standard_normal((1, 9, 11, 2))
    rois = rotated_rois(rng, 1, 9, 11, 4, edge=False)
    rois[:, 3:5] = np.maximum(rois[:, 3:5], 2.0)
    kw = dict(sampling_ratio=sampling_ratio, aligned=aligned)
    cot = rng.standard_normal((rois.shape[0], 2, 3, 2))
    grad = jax.grad(lambda r: jnp.sum(kernel_rotated(jnp.asarray(feats), r, (2, 3), **kw) * cot))(jnp.asarray(rois))
    eps = 1e-6
    numeric = np.zeros_like(rois)
    for k in range(rois.shape[0]):
        for j in range(1, 6):
            up, down = rois[k:k + 1].copy(), rois[k:k + 1].copy()
            up[0, j] += eps
            down[0, j] -= eps
            diff = R.roi_align_rotated_ref(feats, up, (2, 3), **kw) - R.roi_align_rotated_ref(feats, down, (2, 3), **kw)
            numeric[k, j] = np.sum(diff * cot[k:k + 1]) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad), numeric, atol=1e-5, rtol=1e-5)
    assert np.abs(numeric[:, 5]).max() > 1e-3


# Absurd boxes: 1e30 and 3e38 sizes (adaptive: beyond any int of samples per side; 3e38 *
# 0.5 scale stays finite, 3e38 at scale 1 overflows nothing but w*h), far-off centres,
# NaN / inf numbers, an inf angle.
ABSURD = np.array([
    [0, 3, 3, 1e30, 1e30, 30], [1, 3, 3, 1e30, 2, 0], [0, 1e30, 3, 4, 4, 0], [1, 3, 3, 3e38, 3e38, -75],
    [0, -2e6, 1, 4e6, 25, 10], [1, 5, 4, 8, 1e30, 90],
    [-1, 3, 3, 4, 4, 0], [0, np.inf, 3, 4, 4, 0], [0, 3, 3, 4, 4, np.nan], [1, 3, 3, 4, 4, np.inf],
], np.float32)
ABSURD_DEAD = slice(6, None)


@needs_kernels
@pytest.mark.parametrize("dtype, sampling_ratio", [(np.float32, 0), (np.float32, 2),
                                                   pytest.param(np.float64, 0, marks=pytest.mark.slow)])
def test_kernels_absurd_boxes_bounded_time_finite(dtype, sampling_ratio):
    """The kernels agree with the pure-JAX path on absurd boxes, every output and gradient is
    finite (zero rows and zero box gradients for the dead ones), and a forward plus
    backward takes under a second once compiled (wide bins visit a window of samples)."""
    feats = jnp.asarray(np.random.default_rng(45).standard_normal((2, 12, 16, 4)), dtype)
    rois = jnp.asarray(ABSURD.astype(dtype))
    for scale in (1.0, 0.5):
        kw = dict(spatial_scale=scale, sampling_ratio=sampling_ratio)
        fn = lambda f, r: kernel_rotated(f, r, 2, **kw)  # noqa: E731
        fwd = jax.jit(fn)
        bwd = jax.jit(jax.grad(lambda f, r: jnp.sum(fn(f, r) ** 2), argnums=(0, 1)))
        best, out, (d_f, d_r) = timed_forward_backward(fwd, bwd, feats, rois)
        assert best < BOUNDED_TIME_S, best
        for a in (out, d_f, d_r):
            assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_array_equal(np.asarray(out)[ABSURD_DEAD], 0)
        np.testing.assert_array_equal(np.asarray(d_r)[ABSURD_DEAD], 0)
        if sampling_ratio <= 0:  # adaptive: the live absurd boxes read the map (1/(g_h g_w) is tiny)
            assert np.abs(np.asarray(out)[:6]).max() > 0
        ref_fn = lambda f, r: xla_rotated(f, r, 2, **kw)  # noqa: E731
        tol = 1e-10 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_fn(feats, rois)), atol=tol, rtol=tol)
        if sampling_ratio > 0:  # (the adaptive pure-JAX gradient compiles for a minute on 2 cores)
            x_f, x_r = jax.grad(lambda f, r: jnp.sum(ref_fn(f, r) ** 2), argnums=(0, 1))(feats, rois)
            np.testing.assert_allclose(np.asarray(d_f), np.asarray(x_f), atol=tol, rtol=tol)
            np.testing.assert_allclose(np.asarray(d_r), np.asarray(x_r), rtol=1e-4,
                                       atol=1e-4 * max(1.0, float(jnp.abs(x_r).max())))


@needs_kernels
def test_kernels_transforms():
    """jit against the oracle; vmap (over the rois of a shared map: per-element gradient
    copies; over the maps: groups folded into one call) against the unbatched calls;
    per-image boxes against rois, NCHW against NHWC; jacrev against grad; jvp (the boxes'
    tangent from the pure-JAX path) against vjp; one backward kernel call in the lowered
    gradient."""
    rng = np.random.default_rng(46)
    feats = jnp.asarray(rng.standard_normal((2, 7, 9, 3)))
    rois = jnp.asarray(rotated_rois(rng, 2, 7, 9, 8, edge=False))
    fn = jax.jit(lambda f, r: kernel_rotated(f, r, (2, 3), sampling_ratio=2))
    np.testing.assert_allclose(fn(feats, rois), R.roi_align_rotated_ref(np.asarray(feats), np.asarray(rois), (2, 3),
                                                                        sampling_ratio=2), atol=1e-12)
    text = jax.jit(jax.grad(lambda f, r: jnp.sum(fn(f, r)), argnums=(0, 1))).lower(feats, rois).as_text()
    assert text.count("custom_call @jax_roi_roi_align_rotated_bwd") == 1
    stacked_rois = jnp.stack([rois, rois[::-1] + jnp.asarray([0, 0.5, -0.25, 0.3, 0.1, 7.0])])
    stacked_feats = jnp.stack([feats, 2 * feats + 1])
    grad = jax.grad(lambda x, r: jnp.sum(fn(x, r) ** 2), argnums=(0, 1))
    for f_axis, x in ((None, feats), (0, stacked_feats)):
        element = [x if f_axis is None else x[n] for n in range(2)]
        batched = jax.vmap(fn, in_axes=(f_axis, 0))(x, stacked_rois)
        per_example = jax.vmap(grad, in_axes=(f_axis, 0))(x, stacked_rois)
        for n in range(2):
            np.testing.assert_allclose(batched[n], fn(element[n], stacked_rois[n]), atol=1e-12)
            for u, v in zip(per_example, grad(element[n], stacked_rois[n])):
                np.testing.assert_allclose(u[n], v, atol=1e-12)
    boxes = jnp.stack([rois[:4, 1:], rois[4:, 1:]])  # image 0's boxes, image 1's
    own_image = rois.at[:, 0].set(jnp.repeat(jnp.arange(2.0), 4))
    np.testing.assert_allclose(kernel_rotated(feats, boxes, 3, sampling_ratio=0).reshape(8, 3, 3, 3),
                               kernel_rotated(feats, own_image, 3, sampling_ratio=0), atol=1e-12)
    np.testing.assert_allclose(kernel_rotated(jnp.moveaxis(feats, -1, 1), rois, 3, data_format="NCHW"),
                               jnp.moveaxis(kernel_rotated(feats, rois, 3), -1, 1), atol=1e-12)
    small = rois[:2]
    cot = jnp.asarray(rng.standard_normal((2, 2, 3, 3)))
    jac = jax.jacrev(lambda r: fn(feats, r))(small)
    np.testing.assert_allclose(jnp.einsum("kabc,kabcij->ij", cot, jac),
                               jax.grad(lambda r: jnp.sum(fn(feats, r) * cot))(small), atol=1e-10)
    t_f = jnp.asarray(rng.standard_normal(feats.shape))
    t_r = jnp.asarray(rng.standard_normal(small.shape)).at[:, 0].set(0)
    _, tangent = jax.jvp(fn, (feats, small), (t_f, t_r))
    v_f, v_r = jax.grad(lambda f, r: jnp.sum(fn(f, r) * cot), argnums=(0, 1))(feats, small)
    np.testing.assert_allclose(float(jnp.sum(tangent * cot)), float(jnp.sum(v_f * t_f) + jnp.sum(v_r * t_r)),
                               rtol=1e-9)


@needs_kernels
@pytest.mark.slow
def test_kernels_hessian_in_the_angle():
    """Second derivatives (forward over the backward kernel, through its pure-JAX meaning)
    equal the pure-JAX path's."""
    rng = np.random.default_rng(48)
    feats = jnp.asarray(rng.standard_normal((2, 7, 9, 3)))
    rois = jnp.asarray(rotated_rois(rng, 2, 7, 9, 3, edge=False))
    hessians = [jax.hessian(lambda a: jnp.sum(op(feats, rois.at[:, 5].set(a), 2, sampling_ratio=2) ** 2))(rois[:, 5])
                for op in (kernel_rotated, xla_rotated)]
    np.testing.assert_allclose(hessians[0], hessians[1], atol=1e-8)
    assert np.abs(np.asarray(hessians[0])).max() > 1e-3


@needs_kernels
def test_kernels_are_the_default_and_take_deterministic():
    """implementation=None picks the kernels on CPU (as for the other ops), "xla" the pure-JAX
    path; `deterministic` is accepted (the CPU kernels are deterministic anyway)."""
    rng = np.random.default_rng(47)
    feats = jnp.asarray(rng.standard_normal((2, 7, 9, 3)), jnp.float32)
    rois = jnp.asarray(rotated_rois(rng, 2, 7, 9, 6), jnp.float32)
    text = jax.jit(lambda f, r: jax_roi.roi_align_rotated(f, r, 2)).lower(feats, rois).as_text()
    assert "custom_call @jax_roi_roi_align_rotated_fwd" in text
    assert "custom_call @jax_roi" not in jax.jit(lambda f, r: xla_rotated(f, r, 2)).lower(feats, rois).as_text()
    np.testing.assert_array_equal(jax_roi.roi_align_rotated(feats, rois, 2, deterministic=True),
                                  jax_roi.roi_align_rotated(feats, rois, 2))
    np.testing.assert_allclose(jax_roi.roi_align_rotated(feats, rois, 2), xla_rotated(feats, rois, 2), atol=1e-5)


@needs_kernels
def test_kernels_raw_targets_reject_bad_arguments():
    """The custom calls check their operands and name what is wrong: [K, 5] rois, an
    over-large sampling_ratio, a d_rois of the wrong shape."""
    f = jnp.zeros((2, 5, 6, 3), jnp.float32)
    rois = jnp.zeros((4, 6), jnp.float32)
    attrs = dict(spatial_scale=np.float64(1), sampling_ratio=np.int64(2), aligned=np.int64(1))
    extra = dict(deterministic=np.int64(0)) if ffi.cuda_emulated() else {}
    fwd = jax.ffi.ffi_call("jax_roi_roi_align_rotated_fwd", jax.ShapeDtypeStruct((4, 2, 2, 3), jnp.float32))
    with pytest.raises(Exception, match=r"roi_align_rotated forward( \(CUDA\))?: rois: expected shape \[K, 6\], "
                                        r"got \[4, 5\]"):
        jax.block_until_ready(fwd(jnp.zeros((4, 5), jnp.float32), f, **attrs))
    with pytest.raises(Exception, match=r"roi_align_rotated forward( \(CUDA\))?: sampling_ratio: expected at most "
                                        r"1024 .*got 1025"):
        jax.block_until_ready(fwd(rois, f, **dict(attrs, sampling_ratio=np.int64(1025))))
    bwd = jax.ffi.ffi_call("jax_roi_roi_align_rotated_bwd", (jax.ShapeDtypeStruct((4, 5), jnp.float32),
                                                             jax.ShapeDtypeStruct(f.shape, jnp.float32)))
    with pytest.raises(Exception, match=r"roi_align_rotated backward( \(CUDA\))?: d_rois: expected shape \[4, 6\], "
                                        r"got \[4, 5\]"):
        jax.block_until_ready(bwd(jnp.zeros((4, 2, 2, 3), jnp.float32), rois, f, rois_grad=np.int64(1), **attrs,
                                  **extra))
