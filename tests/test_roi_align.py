"""roi_align and roi_warp on every built implementation, against the float64 oracle
(tests/reference.py), torchvision's golden data, and the docs' worked examples."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DEAD_ROWS, GOLDEN_PATH, TOLERANCE, output_and_feature_gradient, random_rois

import jax_roi
import reference as R

OPTIONS = [
    dict(sampling_ratio=2, aligned=True, reduction="avg"),
    dict(sampling_ratio=-1, aligned=True, reduction="avg"),
    dict(sampling_ratio=3, aligned=False, reduction="avg"),
    dict(sampling_ratio=0, aligned=False, reduction="avg"),
    dict(sampling_ratio=2, aligned=True, reduction="max"),
    dict(sampling_ratio=-1, aligned=False, reduction="max"),
]


def _op(quantize):
    return jax_roi.roi_warp if quantize else jax_roi.roi_align


def _call(quantize, feats, rois, size, impl, **kw):
    if quantize:
        kw.pop("aligned", None)
    return _op(quantize)(feats, rois, size, implementation=impl, **kw)


def _inputs(seed, dtype=np.float64, B=2, H=9, W=11, C=3, scale=0.5, count=20):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((B, H, W, C))
    rois = random_rois(rng, B, H, W, count, scale=scale)
    return jnp.asarray(feats, dtype), rois, rng


@pytest.mark.parametrize("aligned, first_row", [(True, [8.25, 8.75, 9.25, 9.75]),
                                                (False, [13.75, 14.25, 14.75, 15.25])])
def test_ramp_worked_example(implementation, aligned, first_row):
    feats = jnp.asarray(R.RAMP_MAP, jnp.float32)[None, :, :, None]
    out = jax_roi.roi_align(feats, jnp.array([[0, 1, 1, 3, 3]], jnp.float32), 4, sampling_ratio=2,
                            aligned=aligned, implementation=implementation)
    np.testing.assert_allclose(out[0, 0, :, 0], first_row, atol=1e-6)


@pytest.mark.parametrize("quantize", [False, True], ids=["align", "warp"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_forward_matches_reference(implementation, quantize, opts):
    feats, rois, _ = _inputs(1)
    out = _call(quantize, feats, jnp.asarray(rois), (3, 4), implementation, spatial_scale=0.5, **opts)
    ref = R.roi_align_ref(np.asarray(feats), rois, (3, 4), spatial_scale=0.5, quantize=quantize,
                          **({**opts, "aligned": False} if quantize else opts))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-10, rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(out)[DEAD_ROWS], 0)


@pytest.mark.parametrize("quantize", [False, True], ids=["align", "warp"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_gradients_match_reference(implementation, quantize, opts):
    feats, rois, rng = _inputs(2)
    size = (3, 2)
    cot = rng.standard_normal((rois.shape[0],) + size + (feats.shape[-1],))

    def loss(f, r):
        return jnp.sum(_call(quantize, f, r, size, implementation, spatial_scale=0.5, **opts) * cot)

    d_feats, d_rois = jax.grad(loss, argnums=(0, 1))(feats, jnp.asarray(rois))
    ref_f, ref_r = R.roi_align_ref_vjp(np.asarray(feats), rois, size, cot, spatial_scale=0.5,
                                       quantize=quantize,
                                       **({**opts, "aligned": False} if quantize else opts))
    np.testing.assert_allclose(np.asarray(d_feats), ref_f, atol=1e-9, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(d_rois), ref_r, atol=1e-8, rtol=1e-8)
    assert np.all(np.isfinite(np.asarray(d_rois)))
    np.testing.assert_array_equal(np.asarray(d_rois)[DEAD_ROWS], 0)


@pytest.mark.parametrize("opts", OPTIONS[:2] + OPTIONS[4:5], ids=["sr2", "adaptive", "max"])
def test_box_gradient_central_differences(implementation, opts):
    """Box gradient against central differences of the op itself (float64, boxes away from kinks)."""
    rng = np.random.default_rng(3)
    feats = jnp.asarray(rng.standard_normal((1, 12, 14, 2)))
    rois = np.array([[0, 2.3, 1.7, 9.6, 8.2], [0, 4.1, 3.3, 13.2, 11.4]])
    cot = rng.standard_normal((2, 3, 3, 2))

    def loss(r):
        return jnp.sum(jax_roi.roi_align(feats, r, 3, implementation=implementation, **opts) * cot)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(rois)))
    eps = 1e-6
    for k in range(2):
        for j in range(1, 5):
            d = np.zeros_like(rois)
            d[k, j] = eps
            fd = (loss(jnp.asarray(rois + d)) - loss(jnp.asarray(rois - d))) / (2 * eps)
            np.testing.assert_allclose(grad[k, j], fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16, np.float64],
                         ids=["f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("reduction", ["avg", "max"])
def test_dtypes(implementation, dtype, reduction):
    feats, rois, rng = _inputs(4, dtype=dtype)
    out = jax_roi.roi_align(feats, jnp.asarray(rois), 3, spatial_scale=0.5, sampling_ratio=2,
                            reduction=reduction, implementation=implementation)
    assert out.dtype == jnp.dtype(dtype)
    coord = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    ref = R.roi_align_ref(np.asarray(feats.astype(jnp.float64)), rois.astype(coord), 3, spatial_scale=0.5,
                          sampling_ratio=2, reduction=reduction, coord_dtype=coord)
    atol, rtol = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float64)), ref, atol=atol, rtol=rtol)
    cot = jnp.asarray(rng.standard_normal(out.shape), dtype)
    d_feats = jax.grad(lambda f: jnp.sum((jax_roi.roi_align(
        f, jnp.asarray(rois), 3, spatial_scale=0.5, sampling_ratio=2, reduction=reduction,
        implementation=implementation) * cot).astype(jnp.float32)))(feats)
    assert d_feats.dtype == jnp.dtype(dtype)
    ref_f, _ = R.roi_align_ref_vjp(np.asarray(feats.astype(jnp.float64)), rois.astype(coord), 3,
                                   np.asarray(cot.astype(jnp.float64)), spatial_scale=0.5,
                                   sampling_ratio=2, reduction=reduction, coord_dtype=coord)
    np.testing.assert_allclose(np.asarray(d_feats.astype(jnp.float64)), ref_f, atol=4 * atol, rtol=4 * rtol)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_per_image_boxes_and_layouts(implementation, data_format):
    """[B, R, 4] boxes equal the [K, 5] form; NCHW equals NHWC transposed; vmap over the
    single-image form is the batched form."""
    rng = np.random.default_rng(5)
    feats = jnp.asarray(rng.standard_normal((2, 10, 12, 3)))
    boxes = jnp.asarray(rng.uniform(0, 9, (2, 4, 4)).cumsum(-1)[..., [0, 1, 2, 3]] % 11)
    rois = jnp.concatenate([jnp.repeat(jnp.arange(2.0), 4)[:, None], boxes.reshape(8, 4)], axis=1)
    kw = dict(sampling_ratio=-1, implementation=implementation)
    flat = jax_roi.roi_align(feats, rois, (2, 3), **kw)
    x = feats if data_format == "NHWC" else jnp.transpose(feats, (0, 3, 1, 2))
    per_image = jax_roi.roi_align(x, boxes, (2, 3), data_format=data_format, **kw)
    if data_format == "NCHW":
        per_image = jnp.moveaxis(per_image, -3, -1)
    np.testing.assert_allclose(per_image.reshape(flat.shape), flat, atol=1e-12)
    mapped = jax.vmap(lambda f, b: jax_roi.roi_align(f, b, (2, 3), **kw))(feats, boxes)
    np.testing.assert_allclose(mapped.reshape(flat.shape), flat, atol=1e-12)


def test_transforms_compose(implementation):
    """jit, vmap, grad, checkpoint and scan give the same numbers as the plain call."""
    feats, rois, _ = _inputs(6, count=6)
    rois = jnp.asarray(rois[:6])
    f = functools.partial(jax_roi.roi_align, output_size=3, spatial_scale=0.5, sampling_ratio=-1,
                          implementation=implementation)

    def loss(x, r):
        return jnp.sum(f(x, r) ** 2)

    plain = jax.grad(loss, argnums=(0, 1))(feats, rois)
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(feats, rois)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(feats, rois)
    for a, b in zip(plain, jitted):
        np.testing.assert_allclose(a, b, atol=1e-12)
    for a, b in zip(plain, remat):
        np.testing.assert_allclose(a, b, atol=1e-12)

    def step(carry, r):
        return carry + loss(feats, r), jax.grad(loss, argnums=1)(feats, r)

    total, grads = jax.lax.scan(step, 0.0, jnp.stack([rois, rois + 0.5]))
    np.testing.assert_allclose(total, loss(feats, rois) + loss(feats, rois + 0.5), rtol=1e-12)
    np.testing.assert_allclose(grads[0], plain[1], atol=1e-12)
    batched = jax.vmap(lambda r: f(feats, r))(jnp.stack([rois, rois + 0.5]))
    np.testing.assert_allclose(batched[1], f(feats, rois + 0.5), atol=1e-12)


def test_absurd_and_nonfinite_boxes_are_zero_with_finite_gradients(implementation):
    feats = jnp.asarray(np.random.default_rng(7).standard_normal((1, 6, 6, 2)), jnp.float32)
    rois = jnp.array([[0, np.nan, 0, 3, 3], [0, 0, -np.inf, 3, 3], [0, -1e30, -1e30, 1e30, 1e30],
                      [5, 0, 0, 3, 3], [-1, 0, 0, 3, 3]], jnp.float32)
    for reduction in ("avg", "max"):
        def loss(f, r):
            return jnp.sum(jax_roi.roi_align(f, r, 2, sampling_ratio=-1, reduction=reduction,
                                             implementation=implementation))
        out = jax_roi.roi_align(feats, rois, 2, sampling_ratio=-1, reduction=reduction,
                                implementation=implementation)
        np.testing.assert_array_equal(np.asarray(out)[[0, 1, 3, 4]], 0)
        d_f, d_r = jax.grad(loss, argnums=(0, 1))(feats, rois)
        assert np.all(np.isfinite(np.asarray(d_f))) and np.all(np.isfinite(np.asarray(d_r)))
        np.testing.assert_array_equal(np.asarray(d_r)[[0, 1, 3, 4]], 0)


def _golden_align_tags(g, families=("align", "alignsmall")):
    return [str(t) for fam in families for t in g[f"{fam}_tags"]]


def _golden_align_case(g, tag):
    fam = tag.split("_")[0]
    i = [str(t) for t in g[f"{fam}_tags"]].index(tag)
    s, sr, al, oh, ow = g[f"{fam}_params"][i]
    kw = dict(spatial_scale=float(s), sampling_ratio=int(sr), aligned=bool(al))
    feats = jnp.asarray(g[f"{fam}_features_nhwc"], jnp.float32)
    return feats, g[f"{fam}_rois"], (int(oh), int(ow)), kw


def test_torchvision_golden(implementation, golden_data):
    """float32, atol 1e-5: torchvision.ops.roi_align forward and feature gradient, on every row
    torchvision did not raise on (no cap on the adaptive count, as torchvision)."""
    g = golden_data
    for tag in _golden_align_tags(g):
        feats, rois, size, kw = _golden_align_case(g, tag)
        keep = ~g[f"{tag}_tvfail"]
        cot = np.where(keep[:, None, None, None], g[f"{tag}_cot_nhwc"], 0).astype(np.float32)
        out, d_f = output_and_feature_gradient(
            lambda f: jax_roi.roi_align(f, jnp.asarray(rois), size, implementation=implementation, **kw), feats, cot)
        np.testing.assert_allclose(np.asarray(out)[keep], g[f"{tag}_out_nhwc"][keep], atol=1e-5, rtol=0,
                                   err_msg=tag)
        np.testing.assert_allclose(np.asarray(d_f), g[f"{tag}_dfeat_nhwc"], atol=1e-5, rtol=0, err_msg=tag)


def _large_tags():
    if not os.path.exists(GOLDEN_PATH):
        return []
    with np.load(GOLDEN_PATH) as z:
        return [str(t) for t in z["alignlarge_tags"]] if "alignlarge_tags" in z.files else []


@pytest.mark.parametrize("tag", _large_tags())
def test_torchvision_golden_large_boxes(implementation, golden_data, tag):
    """Boxes 2x to 4x the map, adaptive (sampling_ratio 0 and -1), aligned and legacy:
    torchvision's forward and feature gradient in float32 (1e-5, relative to the values'
    size: adaptive counts of 20 to 56 per bin side sum many samples)."""
    g = golden_data
    feats, rois, size, kw = _golden_align_case(g, tag)
    want = g[f"{tag}_out_nhwc"]
    scale = max(1.0, float(np.abs(want).max()))
    out = jax_roi.roi_align(feats, jnp.asarray(rois), size, implementation=implementation, **kw)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5 * scale, rtol=1e-5)
    cot = jnp.asarray(g[f"{tag}_cot_nhwc"], jnp.float32)
    d_f = jax.grad(lambda f: jnp.sum(jax_roi.roi_align(f, jnp.asarray(rois), size, implementation=implementation,
                                                       **kw) * cot))(feats)
    want_d = g[f"{tag}_dfeat_nhwc"]
    np.testing.assert_allclose(np.asarray(d_f), want_d, atol=1e-5 * max(1.0, float(np.abs(want_d).max())),
                               rtol=1e-5)
