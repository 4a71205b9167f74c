"""multiscale_roi_align and fpn_levels: torchvision's MultiScaleRoIAlign on the golden data,
the float64 oracle (tests/reference.py) on random inputs for every built implementation,
the two box forms, and gradients equal to per-level roi_align's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_rois

import jax_roi
import reference as R

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _jitted(op, output_size, options):
    return jax.jit(functools.partial(op, output_size=output_size, **dict(options)))


def _static(v):
    return tuple(v) if isinstance(v, list) else v


def msra(levels, boxes, output_size, **kw):
    """jax_roi.multiscale_roi_align, jit-compiled (eager dispatch of the pure-JAX path is slow)."""
    options = tuple(sorted((k, _static(v)) for k, v in kw.items()))
    return _jitted(jax_roi.multiscale_roi_align, _static(output_size), options)(levels, boxes)


def align(features, boxes, output_size, **kw):
    """jax_roi.roi_align, jit-compiled."""
    options = tuple(sorted((k, _static(v)) for k, v in kw.items()))
    return _jitted(jax_roi.roi_align, _static(output_size), options)(features, boxes)


def _golden_levels(g, layout="nhwc"):
    return [jnp.asarray(g[f"msra_level{i}_{layout}"], jnp.float32) for i in range(4)]


def _pyramid(rng, B=2, C=3, H=64, W=80, n_levels=4, dtype=np.float64):
    """Levels of a H x W image at strides 4, 8, ...: ``n_levels`` maps ``[B, H/s, W/s, C]``."""
    scales = SCALES[:n_levels]
    levels = [jnp.asarray(rng.standard_normal((B, int(H * s), int(W * s), C)), dtype) for s in scales]
    return levels, list(scales)


def _pyramid_rois(rng, B, H, W, count):
    """Boxes of every size (log-uniform 2..8*max(H, W) px) plus the docs' edge cases."""
    size = np.exp(rng.uniform(np.log(2), np.log(8 * max(H, W)), count))
    aspect = rng.uniform(0.5, 2.0, count)
    bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
    x1 = rng.uniform(-0.2 * W, W, count)
    y1 = rng.uniform(-0.2 * H, H, count)
    b = rng.integers(0, B, count)
    main = np.stack([b, x1, y1, x1 + bw, y1 + bh], axis=1)
    edge = random_rois(rng, B, H, W, 0)  # empty, inverted, sub-pixel, padding, NaN, inf, absurd, ...
    big = np.array([[0, -0.3 * W, -0.4 * H, 8.0 * W, 9.0 * H], [B - 1, -4.0 * W, -3.0 * H, 4.0 * W, 4.0 * H],
                    [0, -96.0, -59.0, 354.0, 391.0]])  # coarsest level, a sample on the map even in adaptive mode
    neg = np.array([[0, 20.0, 10.0, 5.0, 30.0], [B - 1, 5.0, 30.0, 20.0, 10.0]])  # negative area
    return np.concatenate([main, big, edge, neg])


# ----------------------------------------------------------------------------- fpn_levels


def test_fpn_levels_match_golden(golden_data):
    g = golden_data
    rois = g["msra_rois"]
    levels = jax_roi.fpn_levels(jnp.asarray(rois[:, 1:]), list(g["msra_scales"]))
    np.testing.assert_array_equal(np.asarray(levels) + 2, g["msra_levels"])
    np.testing.assert_array_equal(R.fpn_level_ref(rois[:, 1:]), g["msra_levels"])


@pytest.mark.parametrize("n_levels, canonical", [(4, (224, 4)), (3, (224, 4)), (3, (32, 3)), (2, (64, 5))])
def test_fpn_levels_match_reference(n_levels, canonical):
    rng = np.random.default_rng(10)
    rois = _pyramid_rois(rng, 2, 64, 80, 300)
    # exact powers of two of sqrt(area) / s0, where the 1e-6 matters
    s0, k0 = canonical
    exact = np.array([[0, 0, 0, s0 * 2.0 ** e, s0 * 2.0 ** e] for e in range(-5, 4)])
    rois = np.concatenate([rois, exact])
    scales = list(SCALES[:n_levels])
    k_min = 2
    ref = R.fpn_level_ref(rois[:, 1:], s0, k0, k_min, k_min + n_levels - 1)
    ref = np.where(ref >= 0, ref - k_min, -1)
    got = np.asarray(jax_roi.fpn_levels(jnp.asarray(rois[:, 1:]), scales, canonical_scale=s0,
                                        canonical_level=k0))
    # The oracle gives the infinite-area box the coarsest level and roi_aligns it (an inf
    # coordinate: a zero row); jax_roi gives it no level (also a zero row). Same output.
    inf_area = ~np.isfinite((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    np.testing.assert_array_equal(got[~inf_area], ref[~inf_area])
    assert got.dtype == np.int32
    assert got.shape == (rois.shape[0],)
    # the [..., 4] form keeps the leading axes
    np.testing.assert_array_equal(
        jax_roi.fpn_levels(jnp.asarray(rois[:300, 1:]).reshape(3, 100, 4), scales, canonical_scale=s0,
                           canonical_level=k0), got[:300].reshape(3, 100))


def test_fpn_levels_rejects_bad_scales():
    boxes = jnp.zeros((1, 4))
    with pytest.raises(ValueError, match="power of two"):
        jax_roi.fpn_levels(boxes, [0.3])
    with pytest.raises(ValueError, match="consecutive"):
        jax_roi.fpn_levels(boxes, [1 / 4, 1 / 16])


# ----------------------------------------------------------------------------- torchvision golden


def test_torchvision_golden(implementation, golden_data):
    """float32, atol 1e-5, torchvision's MultiScaleRoIAlign (aligned=False), sampling 2 and
    adaptive, on every row (no cap on the adaptive count, as torchvision)."""
    g = golden_data
    levels = _golden_levels(g)
    scales = [float(s) for s in g["msra_scales"]]
    rois = g["msra_rois"]
    for tag, (sr, oh, ow) in zip(g["msra_tags"], g["msra_params"]):
        size = (int(oh), int(ow))
        out = msra(levels, jnp.asarray(rois), size, spatial_scales=scales, sampling_ratio=int(sr),
                   aligned=False, implementation=implementation)
        assert out.dtype == jnp.float32 and out.shape == (rois.shape[0], oh, ow, 3)
        np.testing.assert_allclose(np.asarray(out), g[f"{tag}_out_nhwc"], atol=1e-5, rtol=0, err_msg=str(tag))
        if str(tag) == "msra_sr0_o2x4":  # NCHW, torchvision's own layout
            out_nchw = msra(_golden_levels(g, "nchw"), jnp.asarray(rois), size, spatial_scales=scales,
                            sampling_ratio=int(sr), aligned=False, data_format="NCHW",
                            implementation=implementation)
            np.testing.assert_allclose(np.asarray(out_nchw), g[f"{tag}_out_nchw"], atol=1e-5, rtol=0,
                                       err_msg=str(tag))


def test_torchvision_golden_per_image_boxes(implementation, golden_data):
    """The [B, R, 4] form on torchvision's per-image box lists (cut to a common length: the
    per-image form needs the same R for every image) equals torchvision's rows."""
    g = golden_data
    levels = _golden_levels(g)
    scales = [float(s) for s in g["msra_scales"]]
    b0, b1 = g["msra_boxes_img0"], g["msra_boxes_img1"]
    n = min(len(b0), len(b1))
    boxes = jnp.asarray(np.stack([b0[:n], b1[:n]]))
    tag = "msra_sr2_o7x7"
    out = msra(levels, boxes, 7, spatial_scales=scales, sampling_ratio=2,
                                       aligned=False, implementation=implementation)
    assert out.shape == (2, n, 7, 7, 3)
    golden = g[f"{tag}_out_nhwc"]
    np.testing.assert_allclose(np.asarray(out[0]), golden[:n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out[1]), golden[len(b0):len(b0) + n], atol=1e-5, rtol=0)


def test_torchvision_golden_negative_area(implementation, golden_data):
    """Boxes with exactly one axis inverted have a NaN level in torchvision: all-zero rows."""
    g = golden_data
    levels = [lv[:1] for lv in _golden_levels(g)]
    scales = [float(s) for s in g["msra_scales"]]
    out = msra(levels, jnp.asarray(g["msraneg_rois"]), 2, spatial_scales=scales,
                                       sampling_ratio=2, aligned=False, implementation=implementation)
    np.testing.assert_allclose(np.asarray(out), g["msraneg_out_nhwc"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(out)[:2], 0)
    assert np.abs(np.asarray(out)[2]).max() > 0
    levels_ = np.asarray(jax_roi.fpn_levels(jnp.asarray(g["msraneg_rois"][:, 1:]), scales))
    np.testing.assert_array_equal(levels_, [-1, -1, 0])


# ----------------------------------------------------------------------------- float64 oracle

OPTIONS = [
    dict(sampling_ratio=2, aligned=False),
    dict(sampling_ratio=2, aligned=True),
    dict(sampling_ratio=-1, aligned=True),
    dict(sampling_ratio=0, aligned=False),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: f"sr{o['sampling_ratio']}-al{int(o['aligned'])}")
def test_forward_matches_reference(implementation, opts):
    rng = np.random.default_rng(11)
    levels, scales = _pyramid(rng)
    rois = _pyramid_rois(rng, 2, 64, 80, 24)
    out = msra(levels, jnp.asarray(rois), (3, 2), spatial_scales=scales,
                                       implementation=implementation, **opts)
    ref = R.multiscale_roi_align_ref([np.asarray(lv) for lv in levels], rois, (3, 2), scales, **opts)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-10, rtol=1e-10)
    # every level is used
    lv = np.asarray(jax_roi.fpn_levels(jnp.asarray(rois[:, 1:]), scales))
    assert set(lv.tolist()) >= {0, 1, 2, 3, -1}


@pytest.mark.parametrize("canonical", [(32, 3), (64, 4)])
def test_forward_matches_reference_canonical(implementation, canonical):
    rng = np.random.default_rng(12)
    levels, scales = _pyramid(rng, n_levels=3)
    rois = _pyramid_rois(rng, 2, 64, 80, 30)
    s0, k0 = canonical
    out = msra(levels, jnp.asarray(rois), 2, spatial_scales=scales, sampling_ratio=2,
                                       canonical_scale=s0, canonical_level=k0, implementation=implementation)
    ref = R.multiscale_roi_align_ref([np.asarray(lv) for lv in levels], rois, 2, scales, sampling_ratio=2,
                                     aligned=True, canonical_scale=s0, canonical_level=k0)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_dtypes(implementation, dtype):
    rng = np.random.default_rng(13)
    levels, scales = _pyramid(rng, dtype=dtype)
    rois = _pyramid_rois(rng, 2, 64, 80, 20)
    out = msra(levels, jnp.asarray(rois, jnp.float32), 3, spatial_scales=scales,
                                       sampling_ratio=2, implementation=implementation)
    assert out.dtype == jnp.dtype(dtype)
    ref = R.multiscale_roi_align_ref([np.asarray(lv.astype(jnp.float64)) for lv in levels],
                                     rois.astype(np.float32), 3, scales, sampling_ratio=2, aligned=True,
                                     coord_dtype=np.float32)
    # float32 area of the absurd (1e30) box overflows: jax_roi gives it no level (a zero
    # row) where the float64 oracle pools it on the coarsest level; leave it out here.
    absurd = np.abs(rois[:, 1:]).max(axis=1) > 1e20
    atol = 1e-5 if dtype == np.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float64))[~absurd], ref[~absurd], atol=atol, rtol=atol)


def test_box_forms_and_layouts(implementation):
    """[B, R, 4] equals [K, 5]; NCHW equals NHWC transposed; the single-image form
    ([H, W, C] levels, [R, 4] boxes) under vmap is the batched form."""
    rng = np.random.default_rng(14)
    levels, scales = _pyramid(rng)
    R_ = 12
    boxes = _pyramid_rois(rng, 2, 64, 80, 2 * R_)[:2 * R_, 1:].reshape(2, R_, 4)
    rois = np.concatenate([np.repeat(np.arange(2.0), R_)[:, None], boxes.reshape(-1, 4)], axis=1)
    kw = dict(spatial_scales=scales, sampling_ratio=-1, implementation=implementation)
    flat = msra(levels, jnp.asarray(rois), (2, 3), **kw)
    per_image = msra(levels, jnp.asarray(boxes), (2, 3), **kw)
    assert per_image.shape == (2, R_, 2, 3, 3)
    np.testing.assert_allclose(np.asarray(per_image).reshape(flat.shape), flat, atol=1e-12)
    nchw = msra([jnp.moveaxis(lv, -1, 1) for lv in levels], jnp.asarray(boxes), (2, 3),
                                        data_format="NCHW", **kw)
    assert nchw.shape == (2, R_, 3, 2, 3)
    np.testing.assert_allclose(np.moveaxis(np.asarray(nchw), -3, -1), per_image, atol=1e-12)
    mapped = jax.vmap(lambda lv, b: msra(lv, b, (2, 3), **kw))(levels, jnp.asarray(boxes))
    np.testing.assert_allclose(mapped, per_image, atol=1e-12)


# ----------------------------------------------------------------------------- gradients


def _per_level(levels, rois, size, scales, **kw):
    """Sum over levels of roi_align on that level, masked to the boxes the level rule assigns."""
    lv = jax.lax.stop_gradient(jax_roi.fpn_levels(rois[:, 1:], scales))
    out = 0
    for i, (f, s) in enumerate(zip(levels, scales)):
        mine = rois.at[:, 0].set(jnp.where(lv == i, rois[:, 0], -1))
        out = out + align(f, mine, size, spatial_scale=s, **kw)
    return out


def test_gradients_equal_per_level_roi_align(implementation):
    """Forward and gradients (levels and boxes) equal those of roi_align on each level, masked
    to the boxes the level rule gives it."""
    opts = dict(sampling_ratio=2, aligned=True)
    rng = np.random.default_rng(16)
    levels, scales = _pyramid(rng)
    rois = jnp.asarray(_pyramid_rois(rng, 2, 64, 80, 30))
    size = (3, 2)
    cot = jnp.asarray(rng.standard_normal((rois.shape[0],) + size + (3,)))
    kw = dict(implementation=implementation, **opts)

    def loss(levels, rois):
        return jnp.sum(msra(levels, rois, size, spatial_scales=scales, **kw) * cot)

    def loss_ref(levels, rois):
        return jnp.sum(_per_level(levels, rois, size, scales, **kw) * cot)

    np.testing.assert_allclose(msra(levels, rois, size, spatial_scales=scales, **kw),
                               _per_level(levels, rois, size, scales, **kw), atol=1e-12)
    d_levels, d_rois = jax.jit(jax.grad(loss, argnums=(0, 1)))(levels, rois)
    r_levels, r_rois = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(levels, rois)
    for a, b in zip(d_levels, r_levels):
        assert np.all(np.isfinite(np.asarray(a)))
        assert np.abs(np.asarray(a)).max() > 0  # every level receives gradient
        np.testing.assert_allclose(a, b, atol=1e-10, rtol=1e-10)
    assert np.all(np.isfinite(np.asarray(d_rois)))
    np.testing.assert_allclose(d_rois, r_rois, atol=1e-10, rtol=1e-10)
    # dead rows (padding, past-the-end, NaN, inf, negative area) get no gradient
    dead = ~np.isfinite(np.asarray(rois)).all(axis=1) | (np.asarray(rois)[:, 0] < 0) | (np.asarray(rois)[:, 0] >= 2)
    dead[-2:] = True
    np.testing.assert_array_equal(np.asarray(d_rois)[dead], 0)


def test_box_gradient_central_differences(implementation):
    rng = np.random.default_rng(17)
    levels, scales = _pyramid(rng, n_levels=3)
    # boxes well inside one level's size range (no level change within eps)
    rois = jnp.asarray([[0, 5.3, 7.1, 21.9, 30.2], [1, 10.2, 3.4, 70.7, 58.1], [0, 3.3, 2.2, 75.1, 61.7]])
    cot = jnp.asarray(rng.standard_normal((3, 2, 2, 3)))

    @jax.jit
    def loss(r):
        return jnp.sum(msra(levels, r, 2, spatial_scales=scales, sampling_ratio=2,
                                                    canonical_scale=32, canonical_level=3,
                                                    implementation=implementation) * cot)

    assert set(np.asarray(jax_roi.fpn_levels(rois[:, 1:], scales, canonical_scale=32,
                                             canonical_level=3)).tolist()) == {0, 1, 2}
    grad = np.asarray(jax.grad(loss)(rois))
    eps = 1e-6
    for k in range(3):
        for j in range(1, 5):
            d = np.zeros(rois.shape)
            d[k, j] = eps
            fd = (loss(rois + d) - loss(rois - d)) / (2 * eps)
            np.testing.assert_allclose(grad[k, j], fd, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- single level


def test_single_level_finite_boxes(implementation):
    """One level: every box with a non-negative area goes to it, whatever its size and
    whatever canonical level (torchvision skips the level mapper)."""
    rng = np.random.default_rng(18)
    levels, scales = _pyramid(rng, n_levels=1)
    rois = _pyramid_rois(rng, 2, 64, 80, 20)
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    rois = rois[np.isfinite(area) & (area >= 0)]
    for canonical in ((224, 4), (8, 0)):
        out = msra(levels, jnp.asarray(rois), 2, spatial_scales=scales, sampling_ratio=2,
                                           canonical_scale=canonical[0], canonical_level=canonical[1],
                                           implementation=implementation)
        ref = align(levels[0], jnp.asarray(rois), 2, spatial_scale=scales[0], sampling_ratio=2,
                                implementation=implementation)
        np.testing.assert_allclose(out, ref, atol=1e-12)
        np.testing.assert_allclose(out, R.multiscale_roi_align_ref([np.asarray(levels[0])], rois, 2, scales,
                                                                   sampling_ratio=2, aligned=True), atol=1e-10)


def test_single_level_negative_area_box(implementation):
    """With one level torchvision skips the mapper: a negative-area box is roi_aligned too."""
    rng = np.random.default_rng(19)
    levels, scales = _pyramid(rng, n_levels=1)
    rois = np.array([[0, 20.0, 10.0, 5.0, 30.0], [1, 5.0, 30.0, 20.0, 10.0]])  # one axis inverted
    out = msra(levels, jnp.asarray(rois), 2, spatial_scales=scales, sampling_ratio=2,
                                       aligned=False, implementation=implementation)
    ref = R.multiscale_roi_align_ref([np.asarray(levels[0])], rois, 2, scales, sampling_ratio=2, aligned=False)
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(out, ref, atol=1e-10)


# ----------------------------------------------------------------------------- checks


def test_argument_errors():
    rng = np.random.default_rng(20)
    levels, scales = _pyramid(rng, n_levels=2)
    rois = jnp.zeros((1, 5))
    with pytest.raises(ValueError, match="one scale per level"):
        jax_roi.multiscale_roi_align(levels, rois, 2, spatial_scales=scales[:1])
    with pytest.raises(TypeError, match="spatial_scales"):
        jax_roi.multiscale_roi_align(levels, rois, 2, spatial_scales=0.25)
    with pytest.raises(ValueError, match="power of two"):
        jax_roi.multiscale_roi_align(levels, rois, 2, spatial_scales=[0.25, 0.1])
    with pytest.raises(TypeError, match="features"):
        jax_roi.multiscale_roi_align(levels[0], rois, 2, spatial_scales=scales)
    with pytest.raises(TypeError, match="dtype"):
        jax_roi.multiscale_roi_align([levels[0], levels[1].astype(jnp.float32)], rois, 2, spatial_scales=scales)
