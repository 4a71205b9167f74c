"""Canonical-form ops on the XLA FFI kernels (same signatures and results as ``jax_roi.xla``).

Inputs are canonical (``features [B, H, W, C]``, ``rois [K, 5]`` in the coordinate dtype;
``jax_roi.ops`` does the checking). Each op is

* a ``jax.custom_vjp`` (the custom calls are not differentiable): features and rois
  gradients for RoIAlign; no rois gradient for RoIWarp and RoIPool (docs/semantics.md). The box
  gradient is only computed when the rois are actually differentiated
  (``symbolic_zeros``);
* around ``lax.platform_dependent``: ``cpu`` runs the CPU kernel, ``cuda`` the CUDA kernel
  (when the extension was built with CUDA), every other platform the pure-JAX path of
  ``jax_roi.xla``;
* whose custom calls carry a ``jax.custom_batching.custom_vmap`` rule, so ``jax.vmap``
  lowers to ONE call: a mapped axis of the rois folds into the box axis K (the shared
  feature map is neither broadcast nor copied); a mapped axis of the features folds into
  the image axis B, each mapped element's batch indices offset by ``n * B``.

The targets (registered by ``_loader``; NHWC, rois ``[K, 5]`` f32, f64 for f64 features):

``jax_roi_roi_align_fwd(rois, level[K] i32, *features_l) -> out [K, oh, ow, C]``
    attrs ``spatial_scales`` (f64 array, one per level), ``sampling_ratio``, ``aligned``,
    ``reduction`` (0 avg, 1 max), ``quantize`` (int64). Roi k reads level ``level[k]``
    (outside ``[0, L)``: a zero row).
``jax_roi_roi_align_bwd(cot, rois, level, *features_l) -> (d_rois [K, 5], *d_features_l)``
    the same attrs and ``rois_grad``; ``d_features_l [n*B, H_l, W_l, C]`` in f32 (f64 for
    f64 features), roi batch index ``b`` reads image ``b % B`` (so a vmap over shared
    features needs no copy).
``jax_roi_roi_pool_fwd(rois, features) -> out``, ``jax_roi_roi_pool_bwd(cot, rois,
features) -> d_features``: attrs ``spatial_scale`` (f64), ``binning`` (0 caffe, 1 floor).

The CUDA backward targets take one more attribute, ``deterministic`` (int64): 0 scatters
the feature gradient with atomics (run-to-run differences in the last bits), 1 gathers it
per feature tile in a fixed order (bitwise reproducible, slower). The CPU kernels are
deterministic and take no such attribute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap
from jax.custom_derivatives import SymbolicZero

from jax_roi import xla as _xla
from jax_roi.ffi import _loader
from jax_roi.ffi.partition import image_partitioned

ALIGN_FWD = "jax_roi_roi_align_fwd"
ALIGN_BWD = "jax_roi_roi_align_bwd"
POOL_FWD = "jax_roi_roi_pool_fwd"
POOL_BWD = "jax_roi_roi_pool_bwd"

_REDUCTIONS = {"avg": 0, "max": 1}
_BINNINGS = {"caffe": 0, "floor": 1}


def _acc_dtype(dtype):
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _cuda_built():
    return "cuda" in _loader.platforms()


def _branches(cpu, cuda):
    """``platform_dependent`` branches: the kernels on cpu, and on cuda where built."""
    return dict(cpu=cpu, cuda=cuda) if _cuda_built() else dict(cpu=cpu)


def _ensure_loaded():
    built, error = _loader.load()
    if not built:
        raise RuntimeError(f"jax_roi.ffi: the compiled kernels are unavailable: {error}")


# ---------------------------------------------------------------------------------------
# vmap folding
# ---------------------------------------------------------------------------------------

def _bcast(x, batched, n):
    """``x`` with a leading mapped axis of size ``n`` (broadcast when unmapped: rois only)."""
    return x if batched else jnp.broadcast_to(x, (n,) + x.shape)


def _fold(x):
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _unfold(x, n):
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def _offset_rois(rois, num_images):
    """``rois [N, K, 5]`` -> ``[N*K, 5]`` indexing the folded ``N*B`` images: a live batch
    index ``b`` of mapped element ``n`` becomes ``trunc(b) + n*B``; a dead one -1."""
    n = rois.shape[0]
    b = rois[..., 0]
    live = (b > -1) & (b < num_images)  # trunc(b) in [0, B); False for NaN
    shift = (jnp.arange(n, dtype=rois.dtype) * num_images)[:, None]
    new_b = jnp.where(live, jnp.trunc(jnp.where(live, b, 0)) + shift, -1)
    return _fold(rois.at[..., 0].set(new_b))


# ---------------------------------------------------------------------------------------
# Raw calls (one custom call each, with their batching rules)
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _align_calls(output_size, scales, sampling_ratio, aligned, reduction, quantize, deterministic=None):
    """The forward and backward calls; ``deterministic`` (CUDA targets only) is passed to
    the backward when not None."""
    oh, ow = output_size
    attrs = dict(spatial_scales=np.asarray(scales, np.float64), sampling_ratio=np.int64(sampling_ratio),
                 aligned=np.int64(aligned), reduction=np.int64(_REDUCTIONS[reduction]),
                 quantize=np.int64(quantize))
    bwd_attrs = dict(attrs) if deterministic is None else dict(attrs, deterministic=np.int64(bool(deterministic)))

    @custom_vmap
    def forward(rois, level, features):
        out = jax.ShapeDtypeStruct((rois.shape[0], oh, ow, features[0].shape[-1]), features[0].dtype)
        return jax.ffi.ffi_call(ALIGN_FWD, out)(rois, level, *features, **attrs)

    @forward.def_vmap
    def _forward_rule(n, in_batched, rois, level, features):
        rois_b, level_b, feats_b = in_batched
        if all(feats_b) and rois_b:  # per image: one call, partitioned along the images
            def per_image(rois, level, *features):
                num_images = features[0].shape[-4]
                out = forward(_offset_rois(rois, num_images), _fold(level), tuple(_fold(f) for f in features))
                return _unfold(out, rois.shape[0])
            return image_partitioned(per_image, rois, _bcast(level, level_b, n), *features), True
        if any(feats_b):
            num_images = features[0].shape[-4]
            feats = tuple(_fold(_bcast(f, b, n)) for f, b in zip(features, feats_b))
            rois_f = _offset_rois(_bcast(rois, rois_b, n), num_images)
        else:  # shared feature maps: fold the mapped axis into K only
            feats = tuple(features)
            rois_f = _fold(_bcast(rois, rois_b, n))
        level_f = _fold(_bcast(level, level_b, n))
        out = forward(rois_f, level_f, feats)
        return _unfold(out, n), True

    def make_backward(rois_grad):
        @custom_vmap
        def backward(cot, rois, level, features):
            return _align_bwd_call(cot, rois, level, features, bwd_attrs, rois_grad, features[0].shape[0])

        @backward.def_vmap
        def _backward_rule(n, in_batched, cot, rois, level, features):
            cot_b, rois_b, level_b, feats_b = in_batched
            num_images = features[0].shape[-4]
            if all(feats_b) and rois_b:  # per image: one call, partitioned along the images
                def per_image(cot, rois, level, *features):
                    m = rois.shape[0]
                    d_rois, d_feats = _align_bwd_call(_fold(cot), _offset_rois(rois, num_images), _fold(level),
                                                      tuple(_fold(f) for f in features), bwd_attrs, rois_grad,
                                                      m * num_images)
                    return _unfold(d_rois, m), tuple(_unfold(d, m) for d in d_feats)
                out = image_partitioned(per_image, _bcast(cot, cot_b, n), rois, _bcast(level, level_b, n), *features)
                return out, (True, tuple(True for _ in features))
            if any(feats_b):
                feats = tuple(_fold(_bcast(f, b, n)) for f, b in zip(features, feats_b))
            else:  # shared maps: d_features get n*B images, roi b reading image b % B
                feats = tuple(features)
            rois_f = _offset_rois(_bcast(rois, rois_b, n), num_images)
            level_f = _fold(_bcast(level, level_b, n))
            cot_f = _fold(_bcast(cot, cot_b, n))
            d_rois, d_feats = _align_bwd_call(cot_f, rois_f, level_f, feats, bwd_attrs, rois_grad, n * num_images)
            out = (_unfold(d_rois, n), tuple(_unfold(d, n) for d in d_feats))
            return out, (True, tuple(True for _ in d_feats))

        return backward

    backward = {True: make_backward(True), False: make_backward(False)}
    return forward, backward


def _align_bwd_call(cot, rois, level, features, attrs, rois_grad, out_images):
    acc = _acc_dtype(features[0].dtype)
    outs = [jax.ShapeDtypeStruct(rois.shape, rois.dtype)]
    outs += [jax.ShapeDtypeStruct((out_images,) + f.shape[1:], acc) for f in features]
    res = jax.ffi.ffi_call(ALIGN_BWD, outs)(cot, rois, level, *features, rois_grad=np.int64(bool(rois_grad)),
                                            **attrs)
    return res[0], tuple(res[1:])


@functools.lru_cache(maxsize=None)
def _pool_calls(output_size, spatial_scale, binning, deterministic=None):
    oh, ow = output_size
    attrs = dict(spatial_scale=np.float64(spatial_scale), binning=np.int64(_BINNINGS[binning]))
    bwd_attrs = dict(attrs) if deterministic is None else dict(attrs, deterministic=np.int64(bool(deterministic)))

    @custom_vmap
    def forward(rois, features):
        out = jax.ShapeDtypeStruct((rois.shape[0], oh, ow, features.shape[-1]), features.dtype)
        return jax.ffi.ffi_call(POOL_FWD, out)(rois, features, **attrs)

    @forward.def_vmap
    def _forward_rule(n, in_batched, rois, features):
        rois_b, feats_b = in_batched
        if feats_b and rois_b:  # per image: one call, partitioned along the images
            def per_image(rois, features):
                return _unfold(forward(_offset_rois(rois, features.shape[-4]), _fold(features)), rois.shape[0])
            return image_partitioned(per_image, rois, features), True
        if feats_b:
            rois_f = _offset_rois(_bcast(rois, rois_b, n), features.shape[-4])
            feats = _fold(features)
        else:
            rois_f = _fold(_bcast(rois, rois_b, n))
            feats = features
        return _unfold(forward(rois_f, feats), n), True

    def bwd_call(cot, rois, features, out_images):
        out = jax.ShapeDtypeStruct((out_images,) + features.shape[1:], _acc_dtype(features.dtype))
        return jax.ffi.ffi_call(POOL_BWD, out)(cot, rois, features, **bwd_attrs)

    @custom_vmap
    def backward(cot, rois, features):
        return bwd_call(cot, rois, features, features.shape[0])

    @backward.def_vmap
    def _backward_rule(n, in_batched, cot, rois, features):
        cot_b, rois_b, feats_b = in_batched
        num_images = features.shape[-4]
        if feats_b and rois_b:  # per image: one call, partitioned along the images
            def per_image(cot, rois, features):
                m = rois.shape[0]
                return _unfold(bwd_call(_fold(cot), _offset_rois(rois, num_images), _fold(features),
                                        m * num_images), m)
            return image_partitioned(per_image, _bcast(cot, cot_b, n), rois, features), True
        feats = _fold(features) if feats_b else features
        rois_f = _offset_rois(_bcast(rois, rois_b, n), num_images)
        d = bwd_call(_fold(_bcast(cot, cot_b, n)), rois_f, feats, n * num_images)
        return _unfold(d, n), True

    return forward, backward


# ---------------------------------------------------------------------------------------
# Differentiable ops
# ---------------------------------------------------------------------------------------

def _masked_rois(rois, level, l):
    """Rois of level ``l`` only (the others get batch index -1: zero rows, no gradient)."""
    return rois.at[:, 0].set(jnp.where(level == l, rois[:, 0], -1))


@functools.lru_cache(maxsize=None)
def _align_op(output_size, scales, sampling_ratio, aligned, reduction, quantize, deterministic=False):
    """The differentiable ``f(rois, level, features_tuple) -> [K, oh, ow, C]``."""
    forward, backward = _align_calls(output_size, scales, sampling_ratio, aligned, reduction, quantize)
    _, backward_cuda = _align_calls(output_size, scales, sampling_ratio, aligned, reduction, quantize,
                                    bool(deterministic))

    def xla_forward(rois, level, features):
        out = None
        for l, (f, s) in enumerate(zip(features, scales)):
            o = _xla.roi_align(f, _masked_rois(rois, level, l), output_size, spatial_scale=s, sampling_ratio=sampling_ratio,
                               aligned=aligned, reduction=reduction, quantize=quantize)
            out = o if out is None else out + o
        return out

    def primal(rois, level, features):
        return lax.platform_dependent(rois, level, features, default=xla_forward, **_branches(forward, forward))

    @jax.custom_vjp
    def op(rois, level, features):
        return primal(rois, level, features)

    def op_fwd(rois, level, features):
        features_v = tuple(f.value for f in features)
        want_rois = bool(rois.perturbed) and not quantize
        out = primal(rois.value, level.value, features_v)
        return out, (rois.value, level.value, features_v, want_rois)

    def op_bwd(res, g):
        rois, level, features, want_rois = res
        if isinstance(g, SymbolicZero):
            return None, None, tuple(jnp.zeros_like(f) for f in features)

        def kernel_with(calls):
            def kernel(g, rois, level, features):
                d_rois, d_feats = calls[want_rois](g, rois, level, features)
                return d_rois, tuple(d.astype(f.dtype) for d, f in zip(d_feats, features))
            return kernel

        def fallback(g, rois, level, features):
            _, vjp = jax.vjp(lambda r, fs: xla_forward(r, level, fs), rois, features)
            return vjp(g)

        d_rois, d_feats = lax.platform_dependent(g, rois, level, features, default=fallback,
                                                 **_branches(kernel_with(backward), kernel_with(backward_cuda)))
        return (d_rois if want_rois else None), None, d_feats

    op.defvjp(op_fwd, op_bwd, symbolic_zeros=True)
    return op


@functools.lru_cache(maxsize=None)
def _pool_op(output_size, spatial_scale, binning, deterministic=False):
    forward, backward = _pool_calls(output_size, spatial_scale, binning)
    _, backward_cuda = _pool_calls(output_size, spatial_scale, binning, bool(deterministic))

    def xla_forward(rois, features):
        return _xla.roi_pool(features, rois, output_size, spatial_scale=spatial_scale, binning=binning)

    def primal(rois, features):
        return lax.platform_dependent(rois, features, default=xla_forward, **_branches(forward, forward))

    @jax.custom_vjp
    def op(rois, features):
        return primal(rois, features)

    def op_fwd(rois, features):
        return primal(rois, features), (rois, features)

    def op_bwd(res, g):
        rois, features = res

        def kernel_with(call):
            def kernel(g, rois, features):
                return call(g, rois, features).astype(features.dtype)
            return kernel

        def fallback(g, rois, features):
            _, vjp = jax.vjp(lambda fs: xla_forward(rois, fs), features)
            return vjp(g)[0]

        d = lax.platform_dependent(g, rois, features, default=fallback,
                                   **_branches(kernel_with(backward), kernel_with(backward_cuda)))
        return None, d

    op.defvjp(op_fwd, op_bwd)
    return op


# ---------------------------------------------------------------------------------------
# Public canonical-form functions
# ---------------------------------------------------------------------------------------

def _coords(rois, features):
    return jnp.asarray(rois).astype(_acc_dtype(features.dtype))


def roi_align(features, rois, output_size, *, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
              reduction="avg", quantize=False, deterministic=False):
    """Canonical-form RoIAlign (``quantize=True``: RoIWarp) on the kernels: ``features
    [B, H, W, C]``, ``rois [K, 5]`` -> ``[K, oh, ow, C]``, as ``jax_roi.xla.roi_align``.

    ``deterministic``: on CUDA, a bitwise-reproducible feature gradient (a gather instead
    of atomics; slower). Ignored on CPU, whose kernels are deterministic."""
    _ensure_loaded()
    features = jnp.asarray(features)
    rois = _coords(rois, features)
    quantize = bool(quantize)
    aligned = bool(aligned) and not quantize
    op = _align_op(tuple(int(v) for v in output_size), (float(spatial_scale),), int(sampling_ratio), aligned,
                   reduction, quantize, bool(deterministic))
    level = jnp.zeros((rois.shape[0],), jnp.int32)
    return op(rois, level, (features,))


def multilevel_roi_align(levels, rois, level_ids, output_size, *, spatial_scales, sampling_ratio=-1,
                         aligned=True, deterministic=False):
    """Average RoIAlign of roi ``k`` on ``levels[level_ids[k]]`` (FPN), in ONE call.

    ``levels``: sequence of ``[B, H_l, W_l, C]`` (one dtype, B and C); ``rois [K, 5]``;
    ``level_ids [K]`` int (outside ``[0, L)``: a zero row); ``spatial_scales``: one per
    level. Returns ``[K, oh, ow, C]``. ``deterministic``: as :func:`roi_align`.
    """
    _ensure_loaded()
    levels = tuple(jnp.asarray(f) for f in levels)
    if not levels:
        raise ValueError("levels: expected at least one feature level, got none")
    if len(spatial_scales) != len(levels):
        raise ValueError(f"spatial_scales: expected one scale per level ({len(levels)}), got {len(spatial_scales)}")
    rois = _coords(rois, levels[0])
    op = _align_op(tuple(int(v) for v in output_size), tuple(float(s) for s in spatial_scales),
                   int(sampling_ratio), bool(aligned), "avg", False, bool(deterministic))
    return op(rois, jnp.asarray(level_ids).astype(jnp.int32), levels)


def roi_pool(features, rois, output_size, *, spatial_scale=1.0, binning="caffe", deterministic=False):
    """Canonical-form RoIPool on the kernels, as ``jax_roi.xla.roi_pool``. ``deterministic``:
    as :func:`roi_align`."""
    _ensure_loaded()
    features = jnp.asarray(features)
    rois = _coords(rois, features)
    op = _pool_op(tuple(int(v) for v in output_size), float(spatial_scale), binning, bool(deterministic))
    return op(rois, features)
