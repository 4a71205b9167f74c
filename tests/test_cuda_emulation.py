"""The CUDA kernels' own code, run on the host (the emulated targets, ``_ext.emulated_cuda_targets()``),
against the CPU kernels, call by call, on the shapes that pick different code paths of the
CUDA kernels: channel counts divisible by the 16-byte vector width and not, C = 1, K = 0,
H = W = 1, every dtype, both backward modes (atomic scatter and the deterministic tile
gather), forward and both gradients.

Both sets of targets are registered here under names of their own, so this module runs the
same with or without ``JAX_ROI_EMULATE_CUDA=1``.
"""

import sys
import zlib

import jax
import jax.numpy as jnp

import numpy as np
import pytest

from jax_roi.ffi import _loader
from conftest import random_rois

_loader.load()
_ext = sys.modules.get("jax_roi._ext")
pytestmark = pytest.mark.skipif(_ext is None or not hasattr(_ext, "emulated_cuda_targets"),
                                reason="jax_roi._ext is not built (or has no emulated CUDA targets)")

CPU, EMU = "jax_roi_test_cpu_", "jax_roi_test_emulated_"


def _seed(case):
    """A seed that is the same in every run (``hash`` of a string changes with
    ``PYTHONHASHSEED``, so it made the inputs, and a float16 tie, differ run to run)."""
    return zlib.crc32(repr(case).encode())


def _register():
    for prefix, targets in ((CPU, _ext.cpu_targets()), (EMU, _ext.emulated_cuda_targets())):
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(prefix + name[len("jax_roi_"):], capsule, platform="cpu")


if _ext is not None and hasattr(_ext, "emulated_cuda_targets"):
    _register()

DTYPES = [jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16]
# Channels per 16-byte vector of each dtype.
VEC = {jnp.float64: 2, jnp.float32: 4, jnp.bfloat16: 8, jnp.float16: 8}
# (atol, rtol) between the two kernels: the channel sums may round differently.
TOL = {jnp.float64: (1e-11, 1e-11), jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (2e-2, 2e-2),
       jnp.float16: (3e-3, 3e-3)}


def _acc(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _features(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _rois(rng, num_images, h, w, count, dtype, edge=True):
    return jnp.asarray(random_rois(rng, num_images, h, w, count, scale=0.5, edge=edge), _acc(dtype))


def _close(a, b, dtype, what):
    atol, rtol = TOL[dtype]
    a = np.asarray(jnp.asarray(a, jnp.float64))
    b = np.asarray(jnp.asarray(b, jnp.float64))
    assert a.shape == b.shape, what
    scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
    np.testing.assert_allclose(a, b, atol=atol * scale, rtol=rtol, err_msg=what)


def _channel_cases(dtype):
    v = VEC[dtype]
    return sorted({1, v, v + 1, 3 * v})


# ---------------------------------------------------------------------------------------
# roi_pool
# ---------------------------------------------------------------------------------------

def _pool_fwd(prefix, rois, x, out_hw, scale, binning):
    out = jax.ShapeDtypeStruct((rois.shape[0],) + out_hw + (x.shape[-1],), x.dtype)
    return jax.ffi.ffi_call(prefix + "roi_pool_fwd", out)(rois, x, spatial_scale=np.float64(scale),
                                                          binning=np.int64(binning))


def _pool_bwd(prefix, cot, rois, x, scale, binning, out_images, deterministic=None):
    out = jax.ShapeDtypeStruct((out_images,) + x.shape[1:], _acc(x.dtype))
    attrs = dict(spatial_scale=np.float64(scale), binning=np.int64(binning))
    if deterministic is not None:
        attrs["deterministic"] = np.int64(deterministic)
    return jax.ffi.ffi_call(prefix + "roi_pool_bwd", out)(cot, rois, x, **attrs)


POOL_SHAPES = [(2, 7, 9), (1, 1, 1), (3, 12, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("bhw", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("binning", [0, 1], ids=["caffe", "floor"])
def test_roi_pool(dtype, bhw, binning):
    rng = np.random.default_rng(_seed((jnp.dtype(dtype).name, bhw, binning)))
    b, h, w = bhw
    for c in _channel_cases(dtype):
        x = _features(rng, (b, h, w, c), dtype)
        rois = _rois(rng, b, h, w, 5, dtype)
        out_hw = (3, 2)
        want = _pool_fwd(CPU, rois, x, out_hw, 0.5, binning)
        got = _pool_fwd(EMU, rois, x, out_hw, 0.5, binning)
        _close(got, want, dtype, f"forward C={c}")
        cot = _features(rng, want.shape, dtype)
        for out_images in (b, 2 * b):  # 2 * b: a vmapped call's folded images
            want_d = _pool_bwd(CPU, cot, rois, x, 0.5, binning, out_images)
            for det in (0, 1):
                got_d = _pool_bwd(EMU, cot, rois, x, 0.5, binning, out_images, det)
                _close(got_d, want_d, dtype, f"backward C={c} deterministic={det} images={out_images}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_roi_pool_no_rois(dtype):
    rng = np.random.default_rng(1)
    x = _features(rng, (2, 5, 6, 8), dtype)
    rois = jnp.zeros((0, 5), _acc(dtype))
    assert _pool_fwd(EMU, rois, x, (2, 2), 1.0, 0).shape == (0, 2, 2, 8)
    cot = jnp.zeros((0, 2, 2, 8), dtype)
    for det in (0, 1):
        d = _pool_bwd(EMU, cot, rois, x, 1.0, 0, 2, det)
        assert not np.any(np.asarray(d))


def test_roi_pool_deterministic_is_bitwise_reproducible():
    rng = np.random.default_rng(2)
    x = _features(rng, (2, 9, 11, 5), jnp.float32)
    rois = _rois(rng, 2, 9, 11, 12, jnp.float32)
    cot = _features(rng, (rois.shape[0], 3, 3, 5), jnp.float32)
    a = _pool_bwd(EMU, cot, rois, x, 0.5, 0, 2, 1)
    b = _pool_bwd(EMU, cot, rois, x, 0.5, 0, 2, 1)
    assert np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------
# roi_align (avg / max), roi_warp (quantize) and multi-level roi_align
# ---------------------------------------------------------------------------------------

# (sampling_ratio, aligned, quantize)
MODES = {"aligned": (0, 1, 0), "legacy": (2, 0, 0), "warp": (2, 0, 1), "aligned_sr3": (3, 1, 0)}


def _align_attrs(scales, mode, reduction):
    sr, aligned, quantize = MODES[mode]
    return dict(spatial_scales=np.asarray(scales, np.float64), sampling_ratio=np.int64(sr),
                aligned=np.int64(aligned), reduction=np.int64(reduction), quantize=np.int64(quantize))


def _align_fwd(prefix, rois, level, feats, out_hw, attrs):
    out = jax.ShapeDtypeStruct((rois.shape[0],) + out_hw + (feats[0].shape[-1],), feats[0].dtype)
    return jax.ffi.ffi_call(prefix + "roi_align_fwd", out)(rois, level, *feats, **attrs)


def _align_bwd(prefix, cot, rois, level, feats, attrs, rois_grad, out_images, deterministic=None):
    acc = _acc(feats[0].dtype)
    outs = [jax.ShapeDtypeStruct(rois.shape, rois.dtype)]
    outs += [jax.ShapeDtypeStruct((out_images,) + f.shape[1:], acc) for f in feats]
    extra = {} if deterministic is None else dict(deterministic=np.int64(deterministic))
    res = jax.ffi.ffi_call(prefix + "roi_align_bwd", outs)(cot, rois, level, *feats, rois_grad=np.int64(rois_grad),
                                                           **attrs, **extra)
    return res[0], res[1:]


def _check_align(rng, dtype, feats, scales, rois, level, mode, reduction, out_hw=(3, 2), out_images=None,
                 rois_grads=None):
    attrs = _align_attrs(scales, mode, reduction)
    want = _align_fwd(CPU, rois, level, feats, out_hw, attrs)
    got = _align_fwd(EMU, rois, level, feats, out_hw, attrs)
    c = feats[0].shape[-1]
    _close(got, want, dtype, f"forward C={c}")
    cot = _features(rng, want.shape, dtype)
    out_images = feats[0].shape[0] if out_images is None else out_images
    quantize = MODES[mode][2]
    for rois_grad in rois_grads or ([0] if quantize else [1]):
        want_r, want_f = _align_bwd(CPU, cot, rois, level, feats, attrs, rois_grad, out_images)
        for det in (0, 1):
            got_r, got_f = _align_bwd(EMU, cot, rois, level, feats, attrs, rois_grad, out_images, det)
            what = f"C={c} deterministic={det} rois_grad={rois_grad}"
            acc = _acc(dtype)
            for l, (g, w) in enumerate(zip(got_f, want_f)):
                _close(g, w, acc, f"d_features level {l} {what}")
            if rois_grad:
                _close(got_r, want_r, acc, f"d_rois {what}")
            else:
                assert not np.any(np.asarray(got_r)), what


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("mode", ["aligned", "legacy", "warp"])
@pytest.mark.parametrize("reduction", [0, 1], ids=["avg", "max"])
def test_roi_align(dtype, mode, reduction):
    rng = np.random.default_rng(_seed((jnp.dtype(dtype).name, mode, reduction)))
    b, h, w = 2, 7, 9
    for c in _channel_cases(dtype):
        x = _features(rng, (b, h, w, c), dtype)
        rois = _rois(rng, b, h, w, 6, dtype)
        level = jnp.zeros((rois.shape[0],), jnp.int32)
        _check_align(rng, dtype, (x,), (0.5,), rois, level, mode, reduction)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("reduction", [0, 1], ids=["avg", "max"])
def test_roi_align_multi_level(dtype, reduction):
    """Three levels (one 1 x 1), level indices out of range too; a vmapped call's folded
    images (d_features of 2B images)."""
    rng = np.random.default_rng(5 + reduction)
    b, c = 2, VEC[dtype] * 2
    shapes = [(12, 16), (6, 8), (1, 1)]
    scales = (0.5, 0.25, 0.0625)
    feats = tuple(_features(rng, (b, hh, ww, c), dtype) for hh, ww in shapes)
    rois = _rois(rng, b, 12, 16, 9, dtype)
    level = jnp.asarray(rng.integers(-1, 4, rois.shape[0]), jnp.int32)  # -1 and 3: dead
    _check_align(rng, dtype, feats, scales, rois, level, "aligned", reduction, out_hw=(2, 3))
    _check_align(rng, dtype, feats, scales, rois, level, "aligned_sr3", reduction, out_images=2 * b,
                 rois_grads=[0, 1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_roi_align_one_pixel_map(dtype):
    rng = np.random.default_rng(7)
    for c in (1, VEC[dtype], VEC[dtype] + 1):
        x = _features(rng, (2, 1, 1, c), dtype)
        rois = _rois(rng, 2, 1, 1, 4, dtype)
        level = jnp.zeros((rois.shape[0],), jnp.int32)
        for reduction in (0, 1):
            _check_align(rng, dtype, (x,), (1.0,), rois, level, "aligned", reduction, out_hw=(2, 2))


def test_roi_align_large_channels():
    """C past one block's 256 channel vectors / one gather chunk's 128 channels."""
    rng = np.random.default_rng(8)
    for dtype, c in ((jnp.float32, 1028), (jnp.float64, 130), (jnp.float16, 264)):
        x = _features(rng, (1, 5, 6, c), dtype)
        rois = _rois(rng, 1, 5, 6, 3, dtype, edge=False)
        level = jnp.zeros((rois.shape[0],), jnp.int32)
        _check_align(rng, dtype, (x,), (0.5,), rois, level, "aligned", 0, out_hw=(2, 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_roi_align_no_rois(dtype):
    rng = np.random.default_rng(9)
    x = _features(rng, (2, 5, 6, 8), dtype)
    rois = jnp.zeros((0, 5), _acc(dtype))
    level = jnp.zeros((0,), jnp.int32)
    attrs = _align_attrs((1.0,), "aligned", 0)
    assert _align_fwd(EMU, rois, level, (x,), (2, 2), attrs).shape == (0, 2, 2, 8)
    cot = jnp.zeros((0, 2, 2, 8), dtype)
    for det in (0, 1):
        d_rois, (d_x,) = _align_bwd(EMU, cot, rois, level, (x,), attrs, 1, 2, det)
        assert d_rois.shape == (0, 5) and not np.any(np.asarray(d_x))


def test_roi_align_deterministic_is_bitwise_reproducible():
    rng = np.random.default_rng(10)
    x = _features(rng, (2, 9, 11, 5), jnp.float32)
    rois = _rois(rng, 2, 9, 11, 12, jnp.float32)
    level = jnp.zeros((rois.shape[0],), jnp.int32)
    attrs = _align_attrs((0.5,), "aligned", 0)
    cot = _features(rng, (rois.shape[0], 3, 3, 5), jnp.float32)
    a = _align_bwd(EMU, cot, rois, level, (x,), attrs, 1, 2, 1)
    b = _align_bwd(EMU, cot, rois, level, (x,), attrs, 1, 2, 1)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(u), np.asarray(v))


def test_emulated_targets_take_the_cuda_attributes():
    """The emulated backward targets want `deterministic`, as the CUDA ones; the CPU ones
    do not take it."""
    rng = np.random.default_rng(11)
    x = _features(rng, (1, 4, 4, 2), jnp.float32)
    rois = jnp.asarray([[0, 0, 0, 3, 3]], jnp.float32)
    level = jnp.zeros((1,), jnp.int32)
    attrs = _align_attrs((1.0,), "aligned", 0)
    cot = jnp.ones((1, 2, 2, 2), jnp.float32)
    with pytest.raises(Exception, match="attribute"):
        _align_bwd(EMU, cot, rois, level, (x,), attrs, 1, 1)
    with pytest.raises(Exception, match="attribute"):
        _align_bwd(CPU, cot, rois, level, (x,), attrs, 1, 1, 0)
    with pytest.raises(Exception, match="attribute"):
        _pool_bwd(EMU, cot, rois, x, 1.0, 0, 1)


# ---------------------------------------------------------------------------------------
# ps_roi_align, ps_roi_pool (position-sensitive: C = C_out * oh * ow input channels)
# ---------------------------------------------------------------------------------------

def _ps_attrs(op, scale, sampling_ratio):
    attrs = dict(spatial_scale=np.float64(scale))
    if op == "ps_roi_align":
        attrs["sampling_ratio"] = np.int64(sampling_ratio)
    return attrs


def _ps_fwd(prefix, op, rois, x, out_hw, attrs):
    c_out = x.shape[-1] // (out_hw[0] * out_hw[1])
    out = jax.ShapeDtypeStruct((rois.shape[0],) + out_hw + (c_out,), x.dtype)
    return jax.ffi.ffi_call(prefix + op + "_fwd", out)(rois, x, **attrs)


def _ps_bwd(prefix, op, cot, rois, x, attrs, out_images, rois_grad=1, deterministic=None):
    """(d_rois or None, d_features)."""
    grad = jax.ShapeDtypeStruct((out_images,) + x.shape[1:], _acc(x.dtype))
    extra = {} if deterministic is None else dict(deterministic=np.int64(deterministic))
    if op == "ps_roi_align":
        outs = [jax.ShapeDtypeStruct(rois.shape, rois.dtype), grad]
        d_rois, d_x = jax.ffi.ffi_call(prefix + op + "_bwd", outs)(cot, rois, x, rois_grad=np.int64(rois_grad),
                                                                   **attrs, **extra)
        return d_rois, d_x
    return None, jax.ffi.ffi_call(prefix + op + "_bwd", grad)(cot, rois, x, **attrs, **extra)


def _check_ps(rng, op, dtype, x, rois, out_hw, scale, sampling_ratio, out_images):
    attrs = _ps_attrs(op, scale, sampling_ratio)
    want = _ps_fwd(CPU, op, rois, x, out_hw, attrs)
    got = _ps_fwd(EMU, op, rois, x, out_hw, attrs)
    what = f"{op} C={x.shape[-1]} {out_hw} sr={sampling_ratio}"
    _close(got, want, dtype, f"forward {what}")
    cot = _features(rng, want.shape, dtype)
    for rois_grad in ((0, 1) if op == "ps_roi_align" else (1,)):
        want_r, want_d = _ps_bwd(CPU, op, cot, rois, x, attrs, out_images, rois_grad)
        for det in (0, 1):
            got_r, got_d = _ps_bwd(EMU, op, cot, rois, x, attrs, out_images, rois_grad, det)
            how = f"{what} deterministic={det} rois_grad={rois_grad} images={out_images}"
            _close(got_d, want_d, _acc(dtype), f"d_features {how}")
            if got_r is not None:
                if rois_grad:
                    _close(got_r, want_r, _acc(dtype), f"d_rois {how}")
                else:
                    assert not np.any(np.asarray(got_r)), how


# (B, H, W), output size, sampling_ratio: a one-pixel map, bins over the channel groups of a
# ragged C_out, a map larger than one 8 x 8 gather tile.
PS_CASES = [((2, 7, 9), (3, 2), 2), ((1, 1, 1), (2, 2), 0), ((2, 12, 17), (2, 3), -1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("op", ["ps_roi_align", "ps_roi_pool"])
def test_position_sensitive(op, dtype):
    """Both position-sensitive ops, emulated against the CPU kernels on every edge box:
    forward, feature gradient in both backward modes (and ps_roi_align's box gradient,
    asked for or not), a vmapped call's folded images (2B)."""
    rng = np.random.default_rng(_seed((op, jnp.dtype(dtype).name)))
    for (b, h, w), out_hw, sr in PS_CASES:
        for c_out in (1, VEC[dtype] + 1):
            x = _features(rng, (b, h, w, c_out * out_hw[0] * out_hw[1]), dtype)
            rois = _rois(rng, b, h, w, 5, dtype)
            for out_images in (b, 2 * b):
                _check_ps(rng, op, dtype, x, rois, out_hw, 0.5, sr, out_images)


def test_position_sensitive_large_channels_and_no_rois():
    """Input channels past one gather chunk (128 float32 / 64 float64 channels) and output
    channels past one block's 256; K = 0."""
    rng = np.random.default_rng(12)
    for op in ("ps_roi_align", "ps_roi_pool"):
        for dtype, c_out, out_hw in ((jnp.float32, 300, (1, 1)), (jnp.float64, 33, (2, 2))):
            x = _features(rng, (1, 5, 6, c_out * out_hw[0] * out_hw[1]), dtype)
            rois = _rois(rng, 1, 5, 6, 3, dtype, edge=False)
            _check_ps(rng, op, dtype, x, rois, out_hw, 0.5, 2, 1)
        x = _features(rng, (2, 5, 6, 8), jnp.float32)
        none = jnp.zeros((0, 5), jnp.float32)
        attrs = _ps_attrs(op, 1.0, 2)
        assert _ps_fwd(EMU, op, none, x, (2, 2), attrs).shape == (0, 2, 2, 2)
        for det in (0, 1):
            _, d = _ps_bwd(EMU, op, jnp.zeros((0, 2, 2, 2), jnp.float32), none, x, attrs, 2, 1, det)
            assert not np.any(np.asarray(d))


def test_position_sensitive_deterministic_is_bitwise_reproducible():
    rng = np.random.default_rng(13)
    x = _features(rng, (2, 9, 11, 3 * 4), jnp.float32)
    rois = _rois(rng, 2, 9, 11, 12, jnp.float32)
    cot = _features(rng, (rois.shape[0], 2, 2, 3), jnp.float32)
    for op in ("ps_roi_align", "ps_roi_pool"):
        attrs = _ps_attrs(op, 0.5, -1)
        a = _ps_bwd(EMU, op, cot, rois, x, attrs, 2, 1, 1)
        b = _ps_bwd(EMU, op, cot, rois, x, attrs, 2, 1, 1)
        for u, v in zip(a, b):
            if u is not None:
                assert np.array_equal(np.asarray(u), np.asarray(v))
        with pytest.raises(Exception, match="attribute"):  # the CUDA backward wants `deterministic`
            _ps_bwd(EMU, op, cot, rois, x, attrs, 2)


# ---------------------------------------------------------------------------------------
# roi_align_rotated (rois [K, 6]: batch, x_ctr, y_ctr, w, h, angle)
# ---------------------------------------------------------------------------------------

def _rotated_rois(rng, num_images, h, w, count, dtype):
    """Random centres, sizes and angles (scale 0.5: image pixels are twice the map's), then
    the edge boxes: empty, negative, padding, out of the batch, NaN, inf angle, and a box
    wider than the kernels' sample window (adaptive: a windowed bin)."""
    cx, cy = rng.uniform(-0.4 * w, 2.4 * w, count), rng.uniform(-0.4 * h, 2.4 * h, count)
    size_w, size_h = rng.uniform(0.5, 1.8 * w, count), rng.uniform(0.5, 1.8 * h, count)
    rois = np.stack([rng.integers(0, num_images, count), cx, cy, size_w, size_h, rng.uniform(-180, 180, count)], 1)
    c = (w, h)
    edge = np.array([[0, *c, 0, 0, 30], [0, *c, -3, 2, 45], [-1, *c, 4, 4, 10], [num_images, *c, 4, 4, 10],
                     [0, np.nan, c[1], 4, 4, 0], [0, *c, 4, 4, np.inf], [0, *c, 40 * (w + h), 3, 25]])
    return jnp.asarray(np.concatenate([rois, edge]), _acc(dtype))


def _rot_attrs(scale, sampling_ratio, aligned):
    return dict(spatial_scale=np.float64(scale), sampling_ratio=np.int64(sampling_ratio), aligned=np.int64(aligned))


def _rot_fwd(prefix, rois, x, out_hw, attrs):
    out = jax.ShapeDtypeStruct((rois.shape[0],) + out_hw + (x.shape[-1],), x.dtype)
    return jax.ffi.ffi_call(prefix + "roi_align_rotated_fwd", out)(rois, x, **attrs)


def _rot_bwd(prefix, cot, rois, x, attrs, out_images, rois_grad, deterministic=None):
    """(d_rois, d_features)."""
    outs = [jax.ShapeDtypeStruct(rois.shape, rois.dtype),
            jax.ShapeDtypeStruct((out_images,) + x.shape[1:], _acc(x.dtype))]
    extra = {} if deterministic is None else dict(deterministic=np.int64(deterministic))
    return jax.ffi.ffi_call(prefix + "roi_align_rotated_bwd", outs)(cot, rois, x, rois_grad=np.int64(rois_grad),
                                                                    **attrs, **extra)


# (B, H, W), output size, sampling_ratio, aligned: a one-pixel map, a map larger than one
# 8 x 8 gather tile, fixed and adaptive sampling, legacy boxes.
ROTATED_CASES = [((2, 7, 9), (3, 2), 2, 1), ((1, 1, 1), (2, 2), 0, 0), ((2, 12, 17), (2, 3), -1, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_roi_align_rotated(dtype):
    """Emulated against the CPU kernels on random angles and the edge boxes: forward, feature
    gradient in both backward modes, box gradient (all five numbers) asked for or not, a
    vmapped call's folded images (2B); channel counts on and off the vector width."""
    rng = np.random.default_rng(_seed(("roi_align_rotated", jnp.dtype(dtype).name)))
    for (b, h, w), out_hw, sr, aligned in ROTATED_CASES:
        for c in (1, VEC[dtype] + 1):
            x = _features(rng, (b, h, w, c), dtype)
            rois = _rotated_rois(rng, b, h, w, 5, dtype)
            attrs = _rot_attrs(0.5, sr, aligned)
            what = f"C={c} {(b, h, w)} {out_hw} sr={sr} aligned={aligned}"
            want = _rot_fwd(CPU, rois, x, out_hw, attrs)
            _close(_rot_fwd(EMU, rois, x, out_hw, attrs), want, dtype, f"forward {what}")
            assert np.any(np.asarray(want, np.float64)), what  # the boxes read the map
            cot = _features(rng, want.shape, dtype)
            for out_images in (b, 2 * b):
                for rois_grad in (0, 1):
                    want_r, want_d = _rot_bwd(CPU, cot, rois, x, attrs, out_images, rois_grad)
                    for det in (0, 1):
                        got_r, got_d = _rot_bwd(EMU, cot, rois, x, attrs, out_images, rois_grad, det)
                        how = f"{what} deterministic={det} rois_grad={rois_grad} images={out_images}"
                        _close(got_d, want_d, _acc(dtype), f"d_features {how}")
                        _close(got_r, want_r, _acc(dtype), f"d_rois {how}")
                        assert rois_grad or not np.any(np.asarray(got_r)), how


def test_roi_align_rotated_large_channels_no_rois_and_determinism():
    """Channels past one block's 256 and one gather chunk (128 float32, 64 float64); K = 0;
    the deterministic backward bitwise reproducible, and the CUDA backward wants
    `deterministic`."""
    rng = np.random.default_rng(14)
    for dtype, c in ((jnp.float32, 300), (jnp.float64, 70)):
        x = _features(rng, (1, 5, 6, c), dtype)
        rois = _rotated_rois(rng, 1, 5, 6, 3, dtype)
        attrs = _rot_attrs(0.5, 2, 1)
        want = _rot_fwd(CPU, rois, x, (2, 2), attrs)
        _close(_rot_fwd(EMU, rois, x, (2, 2), attrs), want, dtype, f"forward C={c}")
        cot = _features(rng, want.shape, dtype)
        want_r, want_d = _rot_bwd(CPU, cot, rois, x, attrs, 1, 1)
        for det in (0, 1):
            got_r, got_d = _rot_bwd(EMU, cot, rois, x, attrs, 1, 1, det)
            _close(got_d, want_d, _acc(dtype), f"d_features C={c} deterministic={det}")
            _close(got_r, want_r, _acc(dtype), f"d_rois C={c} deterministic={det}")
    x = _features(rng, (2, 5, 6, 4), jnp.float32)
    none = jnp.zeros((0, 6), jnp.float32)
    attrs = _rot_attrs(1.0, -1, 1)
    assert _rot_fwd(EMU, none, x, (2, 2), attrs).shape == (0, 2, 2, 4)
    for det in (0, 1):
        _, d = _rot_bwd(EMU, jnp.zeros((0, 2, 2, 4), jnp.float32), none, x, attrs, 2, 1, det)
        assert d.shape == x.shape and not np.any(np.asarray(d))
    x = _features(rng, (2, 9, 11, 12), jnp.float32)
    rois = _rotated_rois(rng, 2, 9, 11, 12, jnp.float32)
    cot = _features(rng, (rois.shape[0], 2, 2, 12), jnp.float32)
    a = _rot_bwd(EMU, cot, rois, x, attrs, 2, 1, 1)
    b = _rot_bwd(EMU, cot, rois, x, attrs, 2, 1, 1)
    for u, v in zip(a, b):
        assert np.array_equal(np.asarray(u), np.asarray(v))
    assert np.any(np.asarray(a[1]))
    with pytest.raises(Exception, match="attribute"):
        _rot_bwd(EMU, cot, rois, x, attrs, 2, 1)
