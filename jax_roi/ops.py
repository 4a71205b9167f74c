"""The public ops: check the arguments, bring them to canonical form, dispatch.

Every implementation computes the same thing (``docs/semantics.md``); ``implementation``
only picks how, through the table ``_IMPLEMENTATIONS``: ``"xla"`` is the pure-JAX
reference path (every platform), ``"ffi"`` the compiled kernels, ``None`` the kernels where
they are built for the default platform and pure JAX elsewhere.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jax_roi import _inputs
from jax_roi import ffi as _ffi
from jax_roi import xla as _xla


def _kernels():
    from jax_roi.ffi import ops as ffi_ops  # loads the extension on first use
    return ffi_ops


# implementation -> (the canonical-form module, the extra keyword arguments it takes:
# the kernels' `deterministic`, the pure-JAX path's `formulation`)
_IMPLEMENTATIONS: dict[str, tuple[Callable[[], Any], tuple[str, ...]]] = {
    "xla": (lambda: _xla, ("formulation",)),
    "ffi": (_kernels, ("deterministic",)),
}


def _implementation_name(implementation: Any, formulation: Any = None) -> str:
    """``None`` -> the kernels where built for the default platform, else pure JAX; a
    ``formulation`` named explicitly is a pure-JAX formulation, so ``None`` gives pure JAX."""
    _inputs.check_choice("implementation", implementation, _inputs.IMPLEMENTATIONS)
    built = _ffi.platforms()
    if implementation == "ffi" and not built:
        raise RuntimeError(
            "implementation: expected a built implementation; 'ffi' needs the compiled "
            "extension jax_roi._ext, which is not built (reinstall with `pip install .`), "
            f"got 'ffi' ({_ffi.load_error()}). Use implementation='xla' or None.")
    if implementation == "ffi" and formulation is not None:
        raise ValueError(f"formulation: expected None with implementation='ffi' (a formulation is a "
                         f"pure-JAX path's, implementation='xla'), got {formulation!r}")
    if implementation is None:
        return "ffi" if jax.default_backend() in built and formulation is None else "xla"
    return implementation


def _implementation_module(implementation: Any):
    return _IMPLEMENTATIONS[_implementation_name(implementation)][0]()


def _implementation(implementation: Any, deterministic: Any = False, **options: Any):
    """The implementation module, and those of the op's options it takes (``deterministic``;
    ``formulation`` for the ops that have one)."""
    options["deterministic"] = _inputs.static_bool("deterministic", deterministic)
    if "formulation" in options:
        _inputs.formulation(options["formulation"], _xla.FORMULATIONS)
    load, takes = _IMPLEMENTATIONS[_implementation_name(implementation, options.get("formulation"))]
    return load(), {name: options[name] for name in takes if name in options}


def roi_align(features, boxes, output_size, *, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
              reduction="avg", data_format="NHWC", implementation=None, deterministic=False,
              formulation=None):
    r"""RoIAlign (Mask R-CNN): bilinear samples on a regular grid in each bin, averaged or maxed.

    For a box ``(x1, y1, x2, y2)`` in image pixels and ``off = 0.5 if aligned else 0``, the
    box in feature pixels starts at ``x1*s - off`` and is ``rw = (x2 - x1)*s`` wide (legacy:
    at least 1); bin ``(ph, pw)`` of an ``oh x ow`` grid holds ``gy x gx`` samples

    .. math:: y = y_1 s - \mathrm{off} + p_h \tfrac{r_h}{o_h} + (i_y + \tfrac12)\tfrac{r_h}{o_h g_y}

    each read bilinearly (zero outside ``[-1, H]``), with ``g = sampling_ratio`` or, when
    ``sampling_ratio <= 0``, ``ceil(r/o)`` (no cap, as torchvision; only the samples that
    can land on the map are visited, so any box costs bounded time).

    Args:
      features: ``[B, H, W, C]`` (``data_format="NHWC"``) or ``[B, C, H, W]``; with per-image
        boxes any leading axes ``[..., H, W, C]``. float16, bfloat16, float32 or float64.
      boxes: ``[K, 5]`` rois ``(batch_index, x1, y1, x2, y2)``, or ``[..., R, 4]`` boxes whose
        leading axes match the features'. A batch index outside ``[0, B)`` or a non-finite
        box gives zeros and no gradient.
      output_size: ``int`` or ``(oh, ow)``.
      spatial_scale: feature pixels per image pixel (1/stride).
      sampling_ratio: samples per bin side (at most 1024); ``<= 0`` is adaptive.
      aligned: the half-pixel offset of Detectron2 (True) or the original Mask R-CNN (False).
      reduction: ``"avg"`` or ``"max"`` over a bin's samples.
      data_format: ``"NHWC"`` (Flax) or ``"NCHW"`` (torchvision).
      implementation: ``None`` (fastest built), ``"xla"`` or ``"ffi"``.
      deterministic: bitwise-reproducible feature gradients on the CUDA kernels (a gather
        backward instead of atomics, slower). The CPU kernels and the pure-JAX path on CPU
        are deterministic anyway; for the pure-JAX path on GPU use XLA's
        ``--xla_gpu_deterministic_ops``.
      formulation: the pure-JAX path's form of the average: ``"gather"`` (reads each
        sample's four neighbours; fastest on CPU and GPU) or ``"matmul"`` (per-box
        interpolation matrices contracted with the map: no gather or scatter, forward or
        backward, for TPU). ``None``: ``"matmul"`` on TPU and ``"gather"`` elsewhere,
        chosen when lowered. Naming one selects the pure-JAX path (with
        ``implementation=None``); ``reduction="max"`` has no matmul form.

    Returns:
      ``[K, oh, ow, C]`` for rois, ``[..., R, oh, ow, C]`` for per-image boxes
      (channels before ``oh, ow`` for NCHW), in the features' dtype.
    """
    return _bilinear(features, boxes, output_size, spatial_scale=spatial_scale,
                     sampling_ratio=sampling_ratio, aligned=aligned, reduction=reduction,
                     data_format=data_format, implementation=implementation, quantize=False,
                     deterministic=deterministic, formulation=formulation)


def roi_warp(features, boxes, output_size, *, spatial_scale=1.0, sampling_ratio=-1, reduction="avg",
             data_format="NHWC", implementation=None, deterministic=False, formulation=None):
    """RoIWarp (MNC): the box is snapped to the feature grid (``round(x*s)``, half away from
    zero), then sampled bilinearly as legacy RoIAlign (``aligned=False``).

    Arguments and result as :func:`roi_align`. Boxes get no gradient (rounding is flat).
    """
    return _bilinear(features, boxes, output_size, spatial_scale=spatial_scale,
                     sampling_ratio=sampling_ratio, aligned=False, reduction=reduction,
                     data_format=data_format, implementation=implementation, quantize=True,
                     deterministic=deterministic, formulation=formulation)


def _bilinear(features, boxes, output_size, *, spatial_scale, sampling_ratio, aligned, reduction,
              data_format, implementation, quantize, deterministic, formulation):
    size = _inputs.output_size_pair(output_size)
    spatial_scale = _inputs.static_float("spatial_scale", spatial_scale)
    sampling_ratio = _inputs.sampling_ratio(sampling_ratio)
    aligned = _inputs.static_bool("aligned", aligned) and not quantize
    _inputs.check_choice("reduction", reduction, _inputs.REDUCTIONS)
    _inputs.formulation(formulation, _xla.FORMULATIONS, reduction)
    impl, extra = _implementation(implementation, deterministic, formulation=formulation)
    canon = _inputs.canonicalize(features, boxes, data_format)
    return canon.apply(functools.partial(
        impl.roi_align, output_size=size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
        aligned=aligned, reduction=reduction, quantize=quantize, **extra))


def roi_pool(features, boxes, output_size, *, spatial_scale=1.0, binning="caffe", data_format="NHWC",
             implementation=None, deterministic=False):
    """RoIPool (Fast R-CNN): the box is quantized to whole cells and each bin takes the max.

    ``binning="caffe"`` (torchvision, the Caffe layer): ``sx = round(x1*s)``, ``rw =
    max(round(x2*s) - sx + 1, 1)``, bin ``pw`` covers ``[floor(pw*rw/ow), ceil((pw+1)*rw/ow))``
    from ``sx``. ``binning="floor"``: ``sx = floor(x1*s)``, ``x2`` exclusive, bins of
    ``floor((ex - sx)/ow)`` cells and the last takes the rest. Bins are clipped to the map; an
    empty bin is 0. The gradient goes to the first maximal cell (row-major); boxes get none.

    Arguments and result as :func:`roi_align`.
    """
    size = _inputs.output_size_pair(output_size)
    spatial_scale = _inputs.static_float("spatial_scale", spatial_scale)
    _inputs.check_choice("binning", binning, _inputs.BINNINGS)
    impl, extra = _implementation(implementation, deterministic)
    canon = _inputs.canonicalize(features, boxes, data_format)
    return canon.apply(functools.partial(impl.roi_pool, output_size=size, spatial_scale=spatial_scale,
                                         binning=binning, **extra))


def multiscale_roi_align(features, boxes, output_size, *, spatial_scales, sampling_ratio=-1, aligned=True,
                         canonical_scale=224, canonical_level=4, data_format="NHWC", implementation=None,
                         deterministic=False, formulation=None):
    """Multi-level (FPN) RoIAlign: each box is average-pooled on one level, chosen by its size.

    The level is :func:`jax_roi.fpn_levels` (torchvision's ``MultiScaleRoIAlign`` rule); the
    result equals ``roi_align`` of each box on its level, in box order. Each box is sampled
    once, on its level only.

    Args:
      features: a sequence of levels, each ``[B, Hl, Wl, C]`` (or ``[B, C, Hl, Wl]`` for
        NCHW; with per-image boxes any common leading axes), finest first.
      boxes: ``[B, R, 4]`` per image or ``[K, 5]`` rois, in image pixels.
      output_size: ``int`` or ``(oh, ow)``.
      spatial_scales: one power of two per level, e.g. ``[1/4, 1/8, 1/16, 1/32]``.
      sampling_ratio, aligned, data_format, implementation, deterministic, formulation: as
        :func:`roi_align` (torchvision's module uses ``aligned=False``). The matmul
        formulation builds each box's matrices for its own level only.
      canonical_scale, canonical_level: ``s0`` and ``k0`` of the level rule.

    Returns:
      ``[B, R, oh, ow, C]`` or ``[K, oh, ow, C]`` in the features' dtype.
    """
    from jax_roi.pyramid import fpn_levels

    size = _inputs.output_size_pair(output_size)
    spatial_scales = _inputs.spatial_scales(spatial_scales)
    sampling_ratio = _inputs.sampling_ratio(sampling_ratio)
    aligned = _inputs.static_bool("aligned", aligned)
    canonical_scale = _inputs.static_float("canonical_scale", canonical_scale)
    canonical_level = _inputs.static_int("canonical_level", canonical_level)
    impl, extra = _implementation(implementation, deterministic, formulation=formulation)
    levels, canon = _inputs.canonicalize_levels(features, boxes, data_format)
    if len(levels) != len(spatial_scales):
        raise ValueError(f"spatial_scales: expected one scale per level ({len(levels)} levels), "
                         f"got {len(spatial_scales)}")

    def pool(levels, rois):
        if len(levels) == 1:  # one level takes every box (torchvision skips the mapper too)
            level_ids = jnp.zeros(rois.shape[:1], jnp.int32)
        else:
            level_ids = fpn_levels(rois[:, 1:], spatial_scales, canonical_scale=canonical_scale,
                                   canonical_level=canonical_level)
            # A box without a level (negative or non-finite area) is pooled to zeros, as a
            # padding box, which is what torchvision's module gives it.
            # (A concatenation, not an indexed update: no scatter in the TPU lowering.)
            batch = jnp.where(level_ids >= 0, rois[:, 0], -1)
            rois = jnp.concatenate([batch[:, None], rois[:, 1:]], axis=1)
        return impl.multilevel_roi_align(levels, rois, jnp.maximum(level_ids, 0), size,
                                         spatial_scales=spatial_scales, sampling_ratio=sampling_ratio,
                                         aligned=aligned, **extra)

    return canon.apply(pool, levels)


def _position_sensitive(implementation: Any, deterministic: Any):
    """The position-sensitive ops' canonical-form module (``jax_roi.xla.position_sensitive``
    or the kernels) and its extra options, chosen as for the other ops."""
    impl, extra = _implementation(implementation, deterministic)
    if impl is _xla:
        from jax_roi.xla import position_sensitive

        return position_sensitive, extra
    return impl, extra


def ps_roi_align(features, boxes, output_size, *, spatial_scale=1.0, sampling_ratio=-1, data_format="NHWC",
                 implementation=None, deterministic=False):
    """Position-sensitive RoIAlign (R-FCN), torchvision's ``ps_roi_align``.

    The features have ``C = C_out * oh * ow`` channels; output channel ``c`` of bin
    ``(ph, pw)`` is aligned RoIAlign (half-pixel offset, no minimum size) of input channel
    ``(c * oh + ph) * ow + pw`` over that bin, averaged over ``gy x gx`` bilinear samples
    (``sampling_ratio``, or ``ceil(bin)`` when ``<= 0``). A bin without samples is 0.

    Args and result as :func:`roi_align` (``implementation`` and ``deterministic`` too: the
    kernels where built), with ``C_out`` output channels. Differentiable in features and
    boxes.
    """
    size = _inputs.output_size_pair(output_size)
    spatial_scale = _inputs.static_float("spatial_scale", spatial_scale)
    sampling_ratio = _inputs.sampling_ratio(sampling_ratio)
    impl, extra = _position_sensitive(implementation, deterministic)
    canon = _inputs.canonicalize(features, boxes, data_format)
    _inputs.position_sensitive_channels(canon.features, size, "NHWC")
    return canon.apply(functools.partial(impl.ps_roi_align, output_size=size, spatial_scale=spatial_scale,
                                         sampling_ratio=sampling_ratio, **extra))


def ps_roi_pool(features, boxes, output_size, *, spatial_scale=1.0, data_format="NHWC", implementation=None,
                deterministic=False):
    """Position-sensitive RoIPool (R-FCN), torchvision's ``ps_roi_pool``: the *mean* of the
    whole cells of each bin, on the bin's own channel group as :func:`ps_roi_align`.

    Bins as torchvision's forward: the box ends rounded half away from zero, the box at
    least one cell, bin edges ``floor(p * bin)`` and ``ceil((p + 1) * bin)`` from its start,
    clipped to ``[0, size - 1]``; an empty bin is 0. The feature gradient is the forward's
    transpose; boxes get none. ``implementation`` and ``deterministic`` as :func:`roi_align`.
    """
    size = _inputs.output_size_pair(output_size)
    spatial_scale = _inputs.static_float("spatial_scale", spatial_scale)
    impl, extra = _position_sensitive(implementation, deterministic)
    canon = _inputs.canonicalize(features, boxes, data_format)
    _inputs.position_sensitive_channels(canon.features, size, "NHWC")
    return canon.apply(functools.partial(impl.ps_roi_pool, output_size=size, spatial_scale=spatial_scale, **extra))


def roi_align_rotated(features, boxes, output_size, *, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
                      data_format="NHWC", implementation=None, deterministic=False):
    r"""Rotated RoIAlign (oriented boxes), detectron2's ``ROIAlignRotated``.

    A box ``(x_ctr, y_ctr, w, h, angle)`` in image pixels, ``angle`` in degrees
    (counter-clockwise as drawn, the y axis pointing down), is an ``oh x ow`` grid of bins
    in its own frame, rotated by ``angle`` about its centre. With ``off = 0.5 if aligned
    else 0``, the centre in feature pixels is ``(x_ctr*s - off, y_ctr*s - off)`` and the
    size ``(w*s, h*s)`` (legacy: each at least 1). Sample ``(iy, ix)`` of bin ``(ph, pw)`` is
    the box-frame point

    .. math:: yy = -\tfrac{h}{2} + (p_h + \tfrac{i_y + 1/2}{g_h})\,b_h,\quad
              xx = -\tfrac{w}{2} + (p_w + \tfrac{i_x + 1/2}{g_w})\,b_w

    read bilinearly at ``y = yy cos t - xx sin t + c_y``, ``x = yy sin t + xx cos t + c_x``
    (zero outside ``[-1, H] x [-1, W]``) and averaged, with ``g = sampling_ratio`` or
    ``ceil(b)`` per side when ``sampling_ratio <= 0``. At ``angle = 0`` this is
    :func:`roi_align` of the box ``(x_ctr - w/2, y_ctr - h/2, x_ctr + w/2, y_ctr + h/2)``.

    Args:
      features: as :func:`roi_align`.
      boxes: ``[K, 6]`` rois ``(batch_index, x_ctr, y_ctr, w, h, angle)``, or ``[..., R, 5]``
        boxes whose leading axes match the features'. A batch index outside ``[0, B)`` or a
        non-finite number gives zeros and no gradient.
      output_size, spatial_scale, sampling_ratio, aligned, data_format: as :func:`roi_align`.
      implementation: ``None`` (the kernels where built for the default platform, else
        pure JAX), ``"xla"`` (pure JAX, every platform) or ``"ffi"`` (the CPU and CUDA
        kernels).
      deterministic: as :func:`roi_align`: bitwise-reproducible feature gradients on the
        CUDA kernels (a gather backward instead of atomics, slower); the CPU kernels are
        deterministic anyway.

    Returns:
      ``[K, oh, ow, C]`` for rois, ``[..., R, oh, ow, C]`` for per-image boxes (channels
      before ``oh, ow`` for NCHW), in the features' dtype. Differentiable in the features and
      in all five box numbers, on both paths.
    """
    size = _inputs.output_size_pair(output_size)
    spatial_scale = _inputs.static_float("spatial_scale", spatial_scale)
    sampling_ratio = _inputs.sampling_ratio(sampling_ratio)
    aligned = _inputs.static_bool("aligned", aligned)
    impl, extra = _implementation(implementation, deterministic)
    canon = _inputs.canonicalize(features, boxes, data_format, coords=5)
    if impl is _xla:
        from jax_roi.xla import rotated

        # One call on all boxes (fold): the pure-JAX path picks its sample window from the
        # largest box present, which a vmap over images would evaluate for every choice.
        return canon.apply(functools.partial(rotated.roi_align_rotated, output_size=size,
                                             spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                                             aligned=aligned), fold=True)
    # The kernels: per-image boxes as a vmap over images, which the kernel primitives fold
    # back into one call (and a batch-sharded jit keeps on each device's images).
    return canon.apply(functools.partial(impl.roi_align_rotated, output_size=size, spatial_scale=spatial_scale,
                                         sampling_ratio=sampling_ratio, aligned=aligned, **extra))
