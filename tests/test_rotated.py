"""roi_align_rotated (detectron2's ROIAlignRotated): the float64 oracle (tests/reference.py,
written from detectron2's definition) on random angles and the edge boxes, torchvision's
roi_align golden data at angle 0, the 90- and 180-degree identities on a transposed or
flipped grid, feature and box gradients (all five numbers, by central differences), the box
forms, layouts and transforms, absurd boxes and the argument errors."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roi
import reference as R
from conftest import output_and_feature_gradient


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
    fn = jax.jit(lambda f, r: jax_roi.roi_align_rotated(f, r, (3, 4), **kw))
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
    out = jax_roi.roi_align_rotated(jnp.asarray(feats), rois, 3, sampling_ratio=0)
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
                                            spatial_scale=float(s), sampling_ratio=int(sr), aligned=bool(al)),
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
    a = jax_roi.roi_align_rotated(jnp.asarray(feats), turned, (3, 4), **kw)
    b = jax_roi.roi_align_rotated(jnp.asarray(feats.transpose(0, 2, 1, 3)), upright, (3, 4), **kw)
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
        a = jax_roi.roi_align_rotated(feats, rois, (3, 4), sampling_ratio=sr)
        b = jax_roi.roi_align_rotated(feats, half, (3, 4), sampling_ratio=sr)
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

    grad = jax.grad(lambda r: jnp.sum(jax_roi.roi_align_rotated(jnp.asarray(feats), r, (2, 3), **kw) * cot))(
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
    fn = jax.jit(jax.value_and_grad(lambda f, r: jnp.sum(jax_roi.roi_align_rotated(f, r, 2) ** 2), argnums=(0, 1)))
    start = time.perf_counter()
    value, (d_f, d_r) = fn(feats, jnp.asarray(rois))
    assert time.perf_counter() - start < 300  # (1e29 samples per side would never end)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(d_f))) and np.all(np.isfinite(np.asarray(d_r)))
    out = jax_roi.roi_align_rotated(feats, rois, 2)
    np.testing.assert_array_equal(np.asarray(out)[3:], 0)
    np.testing.assert_array_equal(np.asarray(d_r)[3:], 0)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (jnp.bfloat16, 3e-2)], ids=["f32", "bf16"])
def test_dtypes(dtype, tol):
    rng = np.random.default_rng(37)
    feats = rng.standard_normal((2, 7, 9, 3))
    rois = rotated_rois(rng, 2, 7, 9, 8)
    out = jax_roi.roi_align_rotated(jnp.asarray(feats, dtype), rois, 3, sampling_ratio=2)
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
    adaptive = jax.jit(lambda f, b: jax_roi.roi_align_rotated(f, b, 3, sampling_ratio=0))
    a = adaptive(feats, jnp.asarray(per_image))
    b = adaptive(feats, jnp.asarray(rois))
    np.testing.assert_allclose(np.asarray(a).reshape(b.shape), np.asarray(b), atol=1e-12)
    c = jax_roi.roi_align_rotated(jnp.moveaxis(feats, -1, 1), rois, 3, sampling_ratio=0, data_format="NCHW")
    np.testing.assert_allclose(np.asarray(c), np.moveaxis(np.asarray(b), -1, 1), atol=1e-12)
    fn = jax.jit(lambda f, b: jax_roi.roi_align_rotated(f, b, 3, sampling_ratio=2))
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
    with pytest.raises(ValueError, match="implementation: expected None or 'xla' for roi_align_rotated"):
        jax_roi.roi_align_rotated(feats, jnp.zeros((3, 6)), 2, implementation="ffi")
    with pytest.raises(ValueError, match="boxes: expected leading axes"):
        jax_roi.roi_align_rotated(jnp.zeros((2, 4, 4, 2)), jnp.zeros((3, 2, 5)), 2)
