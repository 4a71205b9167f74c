"""The gather-free (dense contraction) form of average RoIAlign, jax_roi/xla/matmul.py:
values and gradients against the gather path and the float64 oracle, edge boxes, the
multi-level form, and a TPU lowering with no gather or scatter, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DEAD_ROWS, random_rois

import reference as R
from jax_roi import xla as X
from jax_roi.xla.matmul import contraction_macs, multilevel_roi_align_matmul, roi_align_matmul

OPTIONS = [
    dict(sampling_ratio=2, aligned=True),
    dict(sampling_ratio=-1, aligned=True),
    dict(sampling_ratio=3, aligned=False),
    dict(sampling_ratio=0, aligned=False),
]
IDS = [f"sr{o['sampling_ratio']}-{'aligned' if o['aligned'] else 'legacy'}" for o in OPTIONS]
SIZE = (3, 4)


def _inputs(seed, dtype=np.float64, B=2, H=9, W=11, C=3, scale=0.5, count=20):
    rng = np.random.default_rng(seed)
    feats = jnp.asarray(rng.standard_normal((B, H, W, C)), dtype)
    rois = random_rois(rng, B, H, W, count, scale=scale)
    return feats, rois, rng


def _gather(feats, rois, size, **kw):
    return X.roi_align(feats, rois, size, reduction="avg", formulation="gather", **kw)


@pytest.mark.parametrize("quantize", [False, True], ids=["align", "warp"])
@pytest.mark.parametrize("opts", OPTIONS, ids=IDS)
def test_matches_gather_path_and_oracle(quantize, opts):
    feats, rois, _ = _inputs(1)
    kw = dict(spatial_scale=0.5, quantize=quantize, **opts)
    out = roi_align_matmul(feats, jnp.asarray(rois), SIZE, **kw)
    assert out.shape == (rois.shape[0],) + SIZE + (3,) and out.dtype == feats.dtype
    np.testing.assert_allclose(out, _gather(feats, jnp.asarray(rois), SIZE, **kw), atol=1e-12, rtol=1e-12)
    ref = R.roi_align_ref(np.asarray(feats), rois, SIZE, spatial_scale=0.5, quantize=quantize,
                          sampling_ratio=opts["sampling_ratio"],
                          aligned=False if quantize else opts["aligned"])
    np.testing.assert_allclose(out, ref, atol=1e-10, rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(out)[DEAD_ROWS], 0)
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("size", [(1, 1), (2, 5), (7, 7)])
def test_output_sizes_and_orders(size):
    """Both contraction orders are exercised (a tall output picks columns first)."""
    feats, rois, _ = _inputs(2, H=6, W=13, count=8)
    for opts in OPTIONS[:2]:
        kw = dict(spatial_scale=0.5, **opts)
        np.testing.assert_allclose(roi_align_matmul(feats, jnp.asarray(rois), size, **kw),
                                   _gather(feats, jnp.asarray(rois), size, **kw), atol=1e-12, rtol=1e-12)


def test_columns_first_order():
    from jax_roi.xla.matmul import _rows_first

    assert _rows_first(7, 7, 2, 50, 68)
    assert not _rows_first(14, 1, 1, 8, 3)  # a tall, narrow output on a narrow map
    feats, rois, _ = _inputs(3, B=1, H=8, W=3, count=10)
    kw = dict(spatial_scale=0.5, sampling_ratio=2, aligned=True)
    np.testing.assert_allclose(roi_align_matmul(feats, jnp.asarray(rois), (14, 1), **kw),
                               _gather(feats, jnp.asarray(rois), (14, 1), **kw), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float16, 2e-3), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("opts", OPTIONS[:2], ids=IDS[:2])
def test_dtypes(dtype, tol, opts):
    """16-bit features accumulate in float32 like the gather path; the result keeps the dtype."""
    feats, rois, _ = _inputs(4, dtype=dtype)
    rois = jnp.asarray(rois.astype(np.float32))
    kw = dict(spatial_scale=0.5, **opts)
    out = roi_align_matmul(feats, rois, SIZE, **kw)
    assert out.dtype == jnp.dtype(dtype)
    ref = _gather(feats, rois, SIZE, **kw)
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(ref, np.float64), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(out, np.float64)[DEAD_ROWS], 0)


def _grads(fn, feats, rois, cot, **kw):
    def loss(f, r):
        return jnp.sum(fn(f, r, SIZE, **kw) * cot)

    return jax.grad(loss, argnums=(0, 1))(feats, rois)


@pytest.mark.parametrize("quantize", [False, True], ids=["align", "warp"])
@pytest.mark.parametrize("opts", OPTIONS, ids=IDS)
def test_gradients_match_gather_path(quantize, opts):
    feats, rois, rng = _inputs(5)
    rois = jnp.asarray(rois)
    kw = dict(spatial_scale=0.5, quantize=quantize, **opts)
    cot = jnp.asarray(rng.standard_normal((rois.shape[0],) + SIZE + (3,)))
    d_f, d_r = jax.jit(lambda f, r: _grads(roi_align_matmul, f, r, cot, **kw))(feats, rois)
    x_f, x_r = _grads(_gather, feats, rois, cot, **kw)
    assert np.all(np.isfinite(np.asarray(d_f))) and np.all(np.isfinite(np.asarray(d_r)))
    np.testing.assert_allclose(d_f, x_f, atol=1e-11, rtol=1e-11)
    np.testing.assert_allclose(d_r, x_r, atol=1e-11 * max(1.0, float(jnp.abs(x_r).max())), rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(d_r)[DEAD_ROWS], 0)
    if quantize:  # RoIWarp's snapped box: no derivative through the box corners
        np.testing.assert_array_equal(np.asarray(d_r)[:, 1:], 0)


def test_gradient_vs_oracle_vjp():
    feats, rois, rng = _inputs(6, count=10)
    kw = dict(spatial_scale=0.5, sampling_ratio=2, aligned=True)
    cot = rng.standard_normal((rois.shape[0],) + SIZE + (3,))
    d_f, d_r = _grads(roi_align_matmul, feats, jnp.asarray(rois), jnp.asarray(cot), **kw)
    r_f, r_r = R.roi_align_ref_vjp(np.asarray(feats), rois, SIZE, cot, **kw)
    np.testing.assert_allclose(d_f, r_f, atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(d_r, r_r, atol=1e-9, rtol=1e-9)


def test_edge_boxes_alone():
    """Only edge boxes (empty, inverted, sub-pixel, dead, NaN, inf, 1e30, off/over the map):
    finite values and gradients, dead rows zero."""
    feats, _, rng = _inputs(7)
    rois = jnp.asarray(random_rois(rng, 2, 9, 11, 0, scale=0.5))
    for opts in OPTIONS:
        kw = dict(spatial_scale=0.5, **opts)
        out = roi_align_matmul(feats, rois, SIZE, **kw)
        np.testing.assert_allclose(out, _gather(feats, rois, SIZE, **kw), atol=1e-12, rtol=1e-12)
        d_f, d_r = _grads(roi_align_matmul, feats, rois, jnp.ones_like(out), **kw)
        assert np.all(np.isfinite(np.asarray(d_f))) and np.all(np.isfinite(np.asarray(d_r)))
        np.testing.assert_array_equal(np.asarray(out)[DEAD_ROWS], 0)
        np.testing.assert_array_equal(np.asarray(d_r)[DEAD_ROWS], 0)


def test_vmap_matches_loop():
    feats, rois, _ = _inputs(8, count=6)
    fs = jnp.stack([feats, 2 * feats])
    rs = jnp.stack([jnp.asarray(rois), jnp.asarray(rois) * 0.9])
    kw = dict(spatial_scale=0.5, sampling_ratio=2, aligned=True)
    got = jax.vmap(lambda f, r: roi_align_matmul(f, r, SIZE, **kw))(fs, rs)
    for i in range(2):
        np.testing.assert_allclose(got[i], _gather(fs[i], rs[i], SIZE, **kw), atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- multi-level

SCALES = [1 / 4, 1 / 8, 1 / 16]


def _pyramid(seed, dtype=np.float64, C=4):
    rng = np.random.default_rng(seed)
    levels = [jnp.asarray(rng.standard_normal((2, int(48 * s), int(64 * s), C)), dtype) for s in SCALES]
    rois = random_rois(rng, 2, 48, 64, 24, scale=1.0)
    level_ids = jnp.asarray(rng.integers(0, 3, rois.shape[0]), jnp.int32)
    return levels, rois, level_ids, rng


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("aligned", [True, False])
def test_multilevel_matches_gather_path(sampling_ratio, aligned):
    levels, rois, level_ids, rng = _pyramid(9)
    rois = jnp.asarray(rois)
    kw = dict(spatial_scales=SCALES, sampling_ratio=sampling_ratio, aligned=aligned)
    out = multilevel_roi_align_matmul(levels, rois, level_ids, (3, 2), **kw)
    np.testing.assert_allclose(out, X.multilevel_roi_align(levels, rois, level_ids, (3, 2), **kw),
                               atol=1e-12, rtol=1e-12)
    for l, s in enumerate(SCALES):  # each box is roi_align on its own level
        mine = np.asarray(level_ids) == l
        single = roi_align_matmul(levels[l], rois, (3, 2), spatial_scale=s, sampling_ratio=sampling_ratio,
                                  aligned=aligned)
        np.testing.assert_allclose(np.asarray(out)[mine], np.asarray(single)[mine], atol=1e-12, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(out)[DEAD_ROWS], 0)
    # a level id outside [0, L) gives a zero row and no gradient
    odd = level_ids.at[:4].set(jnp.asarray([-1, 3, 7, -5], jnp.int32))
    np.testing.assert_array_equal(np.asarray(multilevel_roi_align_matmul(levels, rois, odd, (3, 2), **kw))[:4], 0)

    cot = jnp.asarray(rng.standard_normal(out.shape))

    def loss(fn, ids):
        return lambda ls, r: jnp.sum(fn(ls, r, ids, (3, 2), **kw) * cot)

    d_l, d_r = jax.jit(jax.grad(loss(multilevel_roi_align_matmul, level_ids), argnums=(0, 1)))(levels, rois)
    x_l, x_r = jax.grad(loss(X.multilevel_roi_align, level_ids), argnums=(0, 1))(levels, rois)
    for a, b in zip(d_l, x_l):
        np.testing.assert_allclose(a, b, atol=1e-11, rtol=1e-11)
    np.testing.assert_allclose(d_r, x_r, atol=1e-11 * max(1.0, float(jnp.abs(x_r).max())), rtol=1e-10)
    _, o_r = jax.grad(loss(multilevel_roi_align_matmul, odd), argnums=(0, 1))(levels, rois)
    np.testing.assert_array_equal(np.asarray(o_r)[:4], 0)


def test_multilevel_float32():
    levels, rois, level_ids, _ = _pyramid(10, dtype=np.float32)
    rois = jnp.asarray(rois.astype(np.float32))
    kw = dict(spatial_scales=SCALES, sampling_ratio=-1, aligned=True)
    out = multilevel_roi_align_matmul(levels, rois, level_ids, (3, 2), **kw)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, X.multilevel_roi_align(levels, rois, level_ids, (3, 2), **kw),
                               atol=1e-5, rtol=1e-5)


def test_multilevel_vs_oracle():
    """torchvision's MultiScaleRoIAlign oracle, with the levels from the FPN rule."""
    levels, rois, _, _ = _pyramid(11)
    lv = R.fpn_level_ref(rois[:, 1:5], 224, 4, 2, 4)
    level_ids = jnp.asarray(np.where(lv >= 0, lv - 2, -1), jnp.int32)
    out = multilevel_roi_align_matmul(levels, jnp.asarray(rois), level_ids, (3, 2), spatial_scales=SCALES,
                                      sampling_ratio=2, aligned=False)
    ref = R.multiscale_roi_align_ref([np.asarray(l) for l in levels], rois, (3, 2), SCALES, sampling_ratio=2,
                                     aligned=False)
    np.testing.assert_allclose(out, ref, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- TPU lowering


def _tpu_text(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def _assert_dense(text):
    lowered = text.lower()
    for op in ("gather", "scatter", "dynamic_slice", "dynamic_update_slice"):
        assert op not in lowered, f"{op} in the TPU lowering"
    assert "dot_general" in lowered


@pytest.mark.parametrize("sampling_ratio", [2, -1], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("quantize", [False, True], ids=["align", "warp"])
def test_tpu_lowering_has_no_gather_or_scatter(sampling_ratio, quantize):
    feats, rois, _ = _inputs(12, dtype=np.float32, count=6)
    rois = jnp.asarray(rois.astype(np.float32))
    kw = dict(spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=True, quantize=quantize)

    def fwd(f, r):
        return roi_align_matmul(f, r, SIZE, **kw)

    def grad(f, r):
        return jax.grad(lambda f, r: jnp.sum(fwd(f, r) ** 2), argnums=(0, 1))(f, r)

    _assert_dense(_tpu_text(fwd, feats, rois))
    _assert_dense(_tpu_text(grad, feats, rois))
    bf16 = feats.astype(jnp.bfloat16)
    _assert_dense(_tpu_text(grad, bf16, rois))


@pytest.mark.parametrize("sampling_ratio", [2, -1], ids=["fixed", "adaptive"])
def test_tpu_lowering_multilevel(sampling_ratio):
    levels, rois, level_ids, _ = _pyramid(13, dtype=np.float32)
    rois = jnp.asarray(rois.astype(np.float32))
    kw = dict(spatial_scales=SCALES, sampling_ratio=sampling_ratio, aligned=True)

    def fwd(ls, r, ids):
        return multilevel_roi_align_matmul(ls, r, ids, (3, 2), **kw)

    def grad(ls, r, ids):
        return jax.grad(lambda ls, r: jnp.sum(fwd(ls, r, ids) ** 2), argnums=(0, 1))(ls, r)

    _assert_dense(_tpu_text(fwd, levels, rois, level_ids))
    _assert_dense(_tpu_text(grad, levels, rois, level_ids))


def test_gather_path_does_gather():
    """The check above can see a gather: the gather path's TPU lowering has one."""
    feats, rois, _ = _inputs(14, dtype=np.float32, count=4)
    text = _tpu_text(lambda f, r: _gather(f, r, SIZE, spatial_scale=0.5, sampling_ratio=2),
                     feats, jnp.asarray(rois.astype(np.float32)))
    assert "gather" in text


def test_contraction_macs():
    assert contraction_macs(2, 50, 68, 256, 1024, (7, 7)) == 13_351_518_208
    assert contraction_macs(2, 50, 68, 256, 1024, (14, 14)) == 28_449_964_032
    fpn = sum(contraction_macs(2, h, w, 256, 1024, (7, 7)) for h, w in [(200, 272), (100, 136), (50, 68), (25, 34)])
    assert fpn == 271_709_634_560


def test_per_image_form_under_vmap():
    """The public API's per-image form (boxes ``[B, R, 4]``) maps the op over images with one
    image per call: the image one-hot is then ``[K, 1]`` and the matmuls are batched over
    the images (no factor ``B``); values, gradients and a dense TPU lowering as before."""
    feats, _, rng = _inputs(15, count=0)
    boxes = jnp.asarray(np.stack([random_rois(rng, 1, 9, 11, 7, scale=0.5)[:, 1:] for _ in range(2)]))
    kw = dict(spatial_scale=0.5, sampling_ratio=2, aligned=True)

    def per_image(fn):
        def one(image, b):
            rois = jnp.concatenate([jnp.zeros(b.shape[:1] + (1,), b.dtype), b], axis=1)
            return fn(image[None], rois, SIZE, **kw)

        return lambda f, b: jax.vmap(one)(f, b)

    got, want = per_image(roi_align_matmul), per_image(_gather)
    np.testing.assert_allclose(got(feats, boxes), want(feats, boxes), atol=1e-12, rtol=1e-12)

    def grads(fn):
        return jax.grad(lambda f, b: jnp.sum(fn(f, b) ** 2), argnums=(0, 1))

    for a, b in zip(grads(got)(feats, boxes), grads(want)(feats, boxes)):
        np.testing.assert_allclose(a, b, atol=1e-10, rtol=1e-10)
    f32, b32 = feats.astype(jnp.float32), boxes.astype(jnp.float32)
    _assert_dense(_tpu_text(got, f32, b32))
    _assert_dense(_tpu_text(grads(got), f32, b32))
