"""One description of each op's module attributes, shared by ``jax_roi.linen`` and
``jax_roi.nnx``.

Both module sets are generated from :data:`SPECS`: the class names, which function each
calls, its attributes (names, defaults, types, documentation) and the docstrings. A new
keyword argument of an op is added here once and appears in both; ``tests/test_modules.py``
checks that the attributes are exactly the functions' keyword arguments (plus ``dtype``) with
the functions' defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import jax.numpy as jnp

from jax_roi import ops

Size = Union[int, Sequence[int]]

REQUIRED = object()  # the default of an attribute that has none


@dataclasses.dataclass(frozen=True)
class Attr:
    name: str
    default: Any
    type: Any
    doc: str


@dataclasses.dataclass(frozen=True)
class OpSpec:
    cls_name: str
    function: Callable
    title: str
    attrs: tuple
    levels: bool = False  # the features are a sequence of pyramid levels
    example: str = ""
    example_title: str = "a box head"
    box_forms: str = "``[K, 5]`` rois or ``[B, R, 4]``"  # what ``__call__`` documents for ``boxes``

    def names(self):
        return [a.name for a in self.attrs]


def _a(name, default, type_, doc):
    return Attr(name, default, type_, doc)


_OUTPUT_SIZE = _a("output_size", REQUIRED, Size, "``int`` or ``(oh, ow)``, each >= 1.")
_SPATIAL_SCALE = _a("spatial_scale", 1.0, float, "feature pixels per image pixel (1 / stride).")
_SAMPLING = _a("sampling_ratio", -1, int,
               "samples per bin side; ``<= 0`` is adaptive (``ceil(bin size)`` samples, no cap).")
_ALIGNED = _a("aligned", True, bool,
              "the half-pixel offset of Detectron2 (True) or the original Mask R-CNN grid (False).")
_REDUCTION = _a("reduction", "avg", str, "``\"avg\"`` or ``\"max\"`` over a bin's samples.")
_DATA_FORMAT = _a("data_format", "NHWC", str, "``\"NHWC\"`` (Flax) or ``\"NCHW\"`` (torchvision).")
_IMPLEMENTATION = _a("implementation", None, Optional[str],
                     "``None`` (the kernels where built for the platform, else pure JAX), "
                     "``\"xla\"`` or ``\"ffi\"``.")
_DETERMINISTIC = _a("deterministic", False, bool,
                    "bitwise-reproducible feature gradients on the CUDA kernels (slower); the "
                    "other paths are deterministic on CPU anyway.")
_FORMULATION = _a("formulation", None, Optional[str],
                   "the pure-JAX path's form of the average: ``\"gather\"``, ``\"matmul\"`` (no gather or "
                   "scatter, for TPU) or ``None`` (matmul on TPU, gather elsewhere).")
_DTYPE = _a("dtype", None, Any,
            "the dtype of the computation and the output: the features are cast to it "
            "(``None``: kept as they are). Boxes are never cast.")

_HEAD = """
    x = {pool}(features, boxes)   # [B, R, 7, 7, C]
    x = relu(Dense(1024)(x.reshape(x.shape[:-3] + (-1,))))
    scores, deltas = Dense(num_classes)(x), Dense(4 * num_classes)(x)"""

_RFCN = """
    scores = Conv(num_classes * 7 * 7, (1, 1))(features)   # position-sensitive score maps
    x = {pool}(scores, boxes)                              # [B, R, 7, 7, num_classes]
    class_scores = x.mean(axis=(-3, -2))"""

_ORIENTED_HEAD = """
    # boxes [B, R, 5]: (x_ctr, y_ctr, w, h, angle) in image pixels, angle in degrees,
    # counter-clockwise as drawn (y down); each box's 7 x 7 grid follows its rotation
    x = {pool}(features, boxes)   # [B, R, 7, 7, C]
    x = relu(Dense(1024)(x.reshape(x.shape[:-3] + (-1,))))
    scores, deltas = Dense(num_classes)(x), Dense(5 * num_classes)(x)   # (dx, dy, dw, dh, da)"""

SPECS = {
    "RoIAlign": OpSpec(
        "RoIAlign", ops.roi_align, "RoIAlign (Mask R-CNN): :func:`jax_roi.roi_align`",
        (_OUTPUT_SIZE, _SPATIAL_SCALE, _SAMPLING, _ALIGNED, _REDUCTION, _DATA_FORMAT, _IMPLEMENTATION,
         _DETERMINISTIC, _FORMULATION, _DTYPE),
        example=_HEAD.format(pool="RoIAlign(7, spatial_scale=1 / 16, sampling_ratio=2)")),
    "RoIWarp": OpSpec(
        "RoIWarp", ops.roi_warp, "RoIWarp (MNC): :func:`jax_roi.roi_warp` (the legacy grid on the "
        "box rounded to whole cells, so no ``aligned``)",
        (_OUTPUT_SIZE, _SPATIAL_SCALE, _SAMPLING, _REDUCTION, _DATA_FORMAT, _IMPLEMENTATION, _DETERMINISTIC,
         _FORMULATION, _DTYPE),
        example=_HEAD.format(pool="RoIWarp(7, spatial_scale=1 / 16, sampling_ratio=2)")),
    "RoIPool": OpSpec(
        "RoIPool", ops.roi_pool, "RoIPool (Fast R-CNN): :func:`jax_roi.roi_pool`",
        (_OUTPUT_SIZE, _SPATIAL_SCALE,
         _a("binning", "caffe", str, "``\"caffe\"`` (torchvision, the default) or ``\"floor\"``."),
         _DATA_FORMAT, _IMPLEMENTATION, _DETERMINISTIC, _DTYPE),
        example=_HEAD.format(pool="RoIPool(7, spatial_scale=1 / 16)")),
    "MultiScaleRoIAlign": OpSpec(
        "MultiScaleRoIAlign", ops.multiscale_roi_align,
        "Multi-level (FPN) RoIAlign: :func:`jax_roi.multiscale_roi_align`",
        (_OUTPUT_SIZE,
         _a("spatial_scales", REQUIRED, Sequence[float],
            "one power of two per level, finest first, e.g. ``(1/4, 1/8, 1/16, 1/32)``."),
         _SAMPLING,
         _a("aligned", True, bool, "as :class:`RoIAlign` (torchvision's module uses ``False``)."),
         _a("canonical_scale", 224, float, "``s0`` of the FPN level rule."),
         _a("canonical_level", 4, int, "``k0`` of the FPN level rule."),
         _DATA_FORMAT, _IMPLEMENTATION, _DETERMINISTIC, _FORMULATION,
         _a("dtype", None, Any, "as :class:`RoIAlign`; every level is cast to it.")),
        levels=True,
        example=_HEAD.format(pool="MultiScaleRoIAlign(7, spatial_scales=(1/4, 1/8, 1/16, 1/32), "
                                  "sampling_ratio=2)").replace("(features, boxes)", "(levels, boxes)")),
    "PSRoIAlign": OpSpec(
        "PSRoIAlign", ops.ps_roi_align,
        "Position-sensitive RoIAlign (R-FCN): :func:`jax_roi.ps_roi_align`",
        (_OUTPUT_SIZE, _SPATIAL_SCALE, _SAMPLING, _DATA_FORMAT, _IMPLEMENTATION, _DETERMINISTIC, _DTYPE),
        example=_RFCN.format(pool="PSRoIAlign(7, spatial_scale=1 / 16, sampling_ratio=2)"),
        example_title="an R-FCN head"),
    "PSRoIPool": OpSpec(
        "PSRoIPool", ops.ps_roi_pool,
        "Position-sensitive RoIPool (R-FCN, the mean of whole cells): :func:`jax_roi.ps_roi_pool`",
        (_OUTPUT_SIZE, _SPATIAL_SCALE, _DATA_FORMAT, _IMPLEMENTATION, _DETERMINISTIC, _DTYPE),
        example=_RFCN.format(pool="PSRoIPool(7, spatial_scale=1 / 16)"), example_title="an R-FCN head"),
    "RoIAlignRotated": OpSpec(
        "RoIAlignRotated", ops.roi_align_rotated,
        "Rotated RoIAlign (oriented boxes, detectron2's ``ROIAlignRotated``): :func:`jax_roi.roi_align_rotated`",
        (_OUTPUT_SIZE, _SPATIAL_SCALE, _SAMPLING, _ALIGNED, _DATA_FORMAT, _IMPLEMENTATION, _DETERMINISTIC,
         _DTYPE),
        example=_ORIENTED_HEAD.format(pool="RoIAlignRotated(7, spatial_scale=1 / 16, sampling_ratio=2)"),
        example_title="an oriented-box head",
        box_forms="``[K, 6]`` rois ``(batch_index, x_ctr, y_ctr, w, h, angle)`` or ``[B, R, 5]``"),
}


def normalize(name: str, value: Any) -> Any:
    """Static attribute values as hashable tuples (a list ``output_size`` or
    ``spatial_scales`` would not be a valid static attribute of a module graph)."""
    if name in ("output_size", "spatial_scales") and isinstance(value, list):
        return tuple(value)
    return value


def _cast(x, dtype):
    return x if dtype is None else jnp.asarray(x, dtype)


def call(spec: OpSpec, values: dict, features, boxes):
    """``spec.function(features, boxes, output_size, **attributes)``, features cast to
    ``dtype``: the body of every generated module's ``__call__``."""
    dtype = values["dtype"]
    if spec.levels and isinstance(features, (list, tuple)):
        features = [_cast(f, dtype) for f in features]
    elif not spec.levels:
        features = _cast(features, dtype)
    kwargs = {a.name: normalize(a.name, values[a.name]) for a in spec.attrs
              if a.name not in ("output_size", "dtype")}
    return spec.function(features, boxes, normalize("output_size", values["output_size"]), **kwargs)


def docstring(spec: OpSpec, flavour: str) -> str:
    """The generated class docstring; ``flavour`` is ``"linen"`` or ``"nnx"``."""
    section = "Attributes" if flavour == "linen" else "Args"
    lines = [f"{spec.title}, as a stateless ``flax.{flavour}`` module.", "",
             "It holds no parameters or variables; ``module(features, boxes)`` returns exactly what "
             "the function returns with these arguments.", "", f"{section}:"]
    for a in spec.attrs:
        lines.append(f"  {a.name}: {a.doc}")
    if spec.example:
        lines += ["", f"Example, {spec.example_title}::", spec.example]
    return "\n".join(lines) + "\n"


def call_docstring(spec: OpSpec) -> str:
    """The generated ``__call__`` docstring."""
    levels = " (a sequence of levels, finest first)" if spec.levels else ""
    return (f"``features`` ``[B, H, W, C]``{levels} with ``boxes`` {spec.box_forms}; "
            "see the function.")
