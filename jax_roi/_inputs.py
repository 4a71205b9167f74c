"""Checks and normalisation of the public ops' arguments.

Everything that is knowable at trace time (ranks, axis sizes, dtypes, option names) is
checked here, once, for every implementation; each error names the argument, what was
expected and what was given. The implementations then see one canonical form:
NHWC features ``[B, H, W, C]`` and rois ``[K, 5]`` in the coordinate dtype.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DATA_FORMATS = ("NHWC", "NCHW")
REDUCTIONS = ("avg", "max")
BINNINGS = ("caffe", "floor")
IMPLEMENTATIONS = (None, "xla", "ffi")
FEATURE_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)

# Limits, the same numbers the kernels' handlers check (xla_ffi's limits header): a fixed
# sampling_ratio sizes per-bin buffers and loops with its square; the multi-level kernels
# hold a fixed-size table of levels.
MAX_SAMPLING_RATIO = 1024
MAX_LEVELS = 32


def _fail(cls: type, arg: str, expected: str, given: Any) -> None:
    raise cls(f"{arg}: expected {expected}, got {given}")


def check_choice(arg: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        _fail(ValueError, arg, "one of " + ", ".join(repr(c) for c in choices), repr(value))
    return value


def formulation(value: Any, choices: Sequence[str], reduction: str = "avg") -> Any:
    """``formulation``: ``None`` or one of ``choices``; the max reduction has no matmul form."""
    check_choice("formulation", value, (None,) + tuple(choices))
    if reduction == "max" and value == "matmul":
        _fail(ValueError, "formulation", "'gather' or None with reduction='max' (the max has no matmul form)",
              "'matmul'")
    return value


def output_size_pair(output_size: Any) -> tuple[int, int]:
    """``int`` or ``(oh, ow)`` -> ``(oh, ow)``, each a Python int >= 1."""
    if isinstance(output_size, (numbers.Integral, np.integer)) and not isinstance(output_size, bool):
        pair = (int(output_size), int(output_size))
    elif (
        isinstance(output_size, (tuple, list))
        and len(output_size) == 2
        and all(isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool) for v in output_size)
    ):
        pair = (int(output_size[0]), int(output_size[1]))
    else:
        _fail(TypeError, "output_size", "an int or a pair of ints (oh, ow)", repr(output_size))
    if min(pair) < 1:
        _fail(ValueError, "output_size", "sizes >= 1", repr(output_size))
    return pair


def static_float(arg: str, value: Any, *, positive: bool = True) -> float:
    if not isinstance(value, (numbers.Real, np.floating, np.integer)) or isinstance(value, bool):
        _fail(TypeError, arg, "a Python float (a static attribute)", f"{type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        _fail(ValueError, arg, "a finite number > 0" if positive else "a finite number", repr(value))
    return value


def static_int(arg: str, value: Any) -> int:
    if not isinstance(value, (numbers.Integral, np.integer)) or isinstance(value, bool):
        _fail(TypeError, arg, "a Python int (a static attribute)", f"{type(value).__name__} {value!r}")
    return int(value)


def sampling_ratio(value: Any) -> int:
    """``sampling_ratio``: samples per bin side, ``<= 0`` for adaptive, at most
    :data:`MAX_SAMPLING_RATIO`."""
    value = static_int("sampling_ratio", value)
    if value > MAX_SAMPLING_RATIO:
        _fail(ValueError, "sampling_ratio", f"at most {MAX_SAMPLING_RATIO} (or <= 0 for adaptive)", repr(value))
    return value


def spatial_scales(value: Any) -> list[float]:
    """``spatial_scales`` of the multi-level op: one positive float per level, each a power
    of two and half the previous one (FPN levels ``2**-k``), at most :data:`MAX_LEVELS`."""
    if not isinstance(value, (list, tuple)):
        _fail(TypeError, "spatial_scales", "a list or tuple of floats, one per level", type(value).__name__)
    if not 1 <= len(value) <= MAX_LEVELS:
        _fail(ValueError, "spatial_scales", f"between 1 and {MAX_LEVELS} levels", f"{len(value)}")
    scales = [static_float(f"spatial_scales[{i}]", s) for i, s in enumerate(value)]
    ks = []
    for i, s in enumerate(scales):
        k = -math.log2(s)
        if abs(k - round(k)) > 1e-6:
            _fail(ValueError, f"spatial_scales[{i}]", "a power of two (2**-k)", repr(s))
        ks.append(int(round(k)))
    if any(b != a + 1 for a, b in zip(ks, ks[1:])):
        _fail(ValueError, "spatial_scales", "consecutive levels, each half the previous scale", repr(list(value)))
    return scales


def static_bool(arg: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        _fail(TypeError, arg, "a bool", f"{type(value).__name__} {value!r}")
    return bool(value)


def coordinate_dtype(feature_dtype: Any) -> Any:
    """Box arithmetic runs in float32, or float64 for float64 features (docs/semantics.md)."""
    return jnp.float64 if jnp.dtype(feature_dtype) == jnp.float64 else jnp.float32


def check_features(features: Any, *, arg: str = "features", min_rank: int = 3) -> Any:
    features = jnp.asarray(features)
    dtype = jnp.dtype(features.dtype)
    if dtype not in [jnp.dtype(d) for d in FEATURE_DTYPES]:
        _fail(TypeError, arg, "a float16, bfloat16, float32 or float64 array", f"dtype {dtype}")
    if features.ndim < min_rank:
        _fail(ValueError, arg, f"rank >= {min_rank} ([..., H, W, C] or [..., C, H, W])",
              f"shape {tuple(features.shape)}")
    return features


# Coordinates per box -> what they are: corner boxes, and rotated boxes (angle in degrees).
BOX_FORMS = {4: "x1, y1, x2, y2", 5: "x_ctr, y_ctr, w, h, angle"}


def check_boxes(boxes: Any, *, arg: str = "boxes", coords: int = 4) -> Any:
    boxes = jnp.asarray(boxes)
    if not (jnp.issubdtype(boxes.dtype, jnp.floating) or jnp.issubdtype(boxes.dtype, jnp.integer)):
        _fail(TypeError, arg, "a real-valued array", f"dtype {boxes.dtype}")
    if boxes.ndim < 2 or boxes.shape[-1] not in (coords, coords + 1):
        _fail(ValueError, arg, f"[K, {coords + 1}] rois (batch_index, {BOX_FORMS[coords]}) or [..., R, {coords}] boxes",
              f"shape {tuple(boxes.shape)}")
    return boxes


@dataclasses.dataclass(frozen=True)
class Canonical:
    """The canonical form of one call, and how to map the result back.

    ``rois [K, 5]`` are given directly, or (per-image form) made from ``boxes [B, R, 4]``:
    then :meth:`apply` maps the op over images with ``jax.vmap``, so that each image's
    boxes read only their own image. That keeps the batch axis a batch axis in the
    program: under a batch-sharded ``jit`` every device computes its own images (no
    all-gather of the features), and the kernel path folds the map back into one call.
    """

    features: Any  # [B, H, W, C]
    rois: Any  # [K, 5], coordinate dtype (None in the per-image form)
    boxes: Any  # [B, R, 4], coordinate dtype (None in the rois form)
    restore: Callable[[Any], Any]  # [K, oh, ow, C] or [B, R, oh, ow, C] -> the user's layout

    def apply(self, op: Callable[[Any, Any], Any], features: Any = None, *, fold: bool = False) -> Any:
        """``op(features [B, H, W, C] (or a list of levels), rois [K, 5]) -> [K, ...]`` on
        this call's inputs, in the user's layout. ``fold``: per-image boxes become one call
        on rois with their image's index, not a ``vmap`` over images (for an op whose
        cost is chosen from all its boxes at once, which a ``vmap`` would evaluate for
        every choice)."""
        features = self.features if features is None else features
        if self.boxes is None:
            return self.restore(op(features, self.rois))
        if fold:
            num_images, num_boxes = self.boxes.shape[:2]
            index = jnp.broadcast_to(jnp.arange(num_images, dtype=self.boxes.dtype)[:, None, None],
                                     (num_images, num_boxes, 1))
            rois = jnp.concatenate([index, self.boxes], axis=-1).reshape(num_images * num_boxes, -1)
            out = op(features, rois)
            return self.restore(out.reshape((num_images, num_boxes) + out.shape[1:]))

        def one_image(image, boxes):
            image = jax.tree_util.tree_map(lambda x: x[None], image)
            rois = jnp.concatenate([jnp.zeros(boxes.shape[:1] + (1,), boxes.dtype), boxes], axis=1)
            return op(image, rois)

        return self.restore(jax.vmap(one_image)(features, self.boxes))


def canonicalize(features: Any, boxes: Any, data_format: str, coords: int = 4) -> Canonical:
    """Brings features to NHWC ``[B, H, W, C]`` and boxes to rois ``[K, 5]``.

    Box forms (docs/semantics.md, "Inputs"): ``rois [K, 5]`` with ``features [B, H, W, C]``, or
    per-image ``boxes [..., R, 4]`` with ``features [..., H, W, C]`` (same leading axes).
    ``coords=5``: rotated boxes, ``rois [K, 6]`` or ``boxes [..., R, 5]``.
    """
    check_choice("data_format", data_format, DATA_FORMATS)
    features = check_features(features)
    boxes = check_boxes(boxes, coords=coords)
    nchw = data_format == "NCHW"
    if nchw:
        features = jnp.moveaxis(features, -3, -1)
    cdtype = coordinate_dtype(features.dtype)
    if boxes.shape[-1] == coords + 1:
        if boxes.ndim != 2:
            _fail(ValueError, "boxes", f"rank 2 for [K, {coords + 1}] rois", f"shape {tuple(boxes.shape)}")
        if features.ndim != 4:
            _fail(ValueError, "features", f"rank 4 ([B, H, W, C] in {data_format} order) with [K, {coords + 1}] rois",
                  f"shape {tuple(features.shape)}")
        rois = boxes.astype(cdtype)

        def restore(out):
            return jnp.moveaxis(out, -1, -3) if nchw else out

        return Canonical(features, rois, None, restore)

    lead = features.shape[:-3]
    if tuple(boxes.shape[:-2]) != tuple(lead):
        _fail(ValueError, "boxes",
              f"leading axes {tuple(lead)} matching features (shape [..., R, {coords}] = {tuple(lead)} + (R, {coords}))",
              f"shape {tuple(boxes.shape)}")
    num_images = math.prod(lead)
    num_boxes = boxes.shape[-2]
    flat_features = features.reshape((num_images,) + features.shape[-3:])
    flat_boxes = boxes.reshape((num_images, num_boxes, coords)).astype(cdtype)

    def restore(out):  # [B, R, oh, ow, C]
        out = out.reshape(tuple(lead) + out.shape[1:])
        return jnp.moveaxis(out, -1, -3) if nchw else out

    return Canonical(flat_features, None, flat_boxes, restore)


def position_sensitive_channels(features: Any, output_size: tuple, data_format: str) -> int:
    """``C_out``: the input channels ``C`` must be ``C_out * oh * ow`` (one group per bin)."""
    channels = jnp.shape(features)[-3 if data_format == "NCHW" else -1]
    oh, ow = output_size
    if channels % (oh * ow) or channels == 0:
        _fail(ValueError, "features",
              f"a channel count that is a positive multiple of oh * ow = {oh * ow} (output_size {output_size}: "
              "C = C_out * oh * ow)", f"{channels} channels")
    return channels // (oh * ow)


def canonicalize_levels(levels: Any, boxes: Any, data_format: str):
    """The pyramid form: ``levels`` a sequence of maps with the same leading axes, channels
    and dtype. Returns ``(levels [B, Hl, Wl, C] each, the Canonical of the first level)``."""
    if not isinstance(levels, (list, tuple)) or len(levels) == 0:
        _fail(TypeError, "features", "a non-empty list or tuple of feature levels",
              f"{type(levels).__name__}")
    if len(levels) > MAX_LEVELS:
        _fail(ValueError, "features", f"at most {MAX_LEVELS} levels", f"{len(levels)} levels")
    first = canonicalize(levels[0], boxes, data_format)
    out = [first.features]
    for i, level in enumerate(levels[1:], start=1):
        level = check_features(level, arg=f"features[{i}]")
        if level.dtype != levels[0].dtype:
            _fail(TypeError, f"features[{i}]", f"dtype {jnp.dtype(levels[0].dtype)} like features[0]",
                  f"dtype {level.dtype}")
        if data_format == "NCHW":
            level = jnp.moveaxis(level, -3, -1)
        expect = first.features.shape[0]
        lead_ok = level.ndim == jnp.ndim(levels[0]) and (
            level.shape[:-3] == jnp.shape(levels[0])[:-3]) and level.shape[-1] == first.features.shape[-1]
        if not lead_ok:
            _fail(ValueError, f"features[{i}]",
                  f"the leading axes and channel count of features[0] (shape {tuple(jnp.shape(levels[0]))})",
                  f"shape {tuple(level.shape)}")
        out.append(level.reshape((expect,) + level.shape[-3:]))
    return out, first
