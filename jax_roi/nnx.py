"""``flax.nnx`` modules for the jax_roi ops.

Each module is a thin, stateless wrapper (no ``nnx.Param``, no ``nnx.Variable``) around the
function of the same name in :mod:`jax_roi`: the constructor takes the function's keyword
arguments and ``module(features, boxes)`` returns exactly ``jax_roi.<op>(features, boxes,
...)``. The semantics (box forms, layouts, gradients) are those of the functions; see
``SEMANTICS.md``. Every attribute is a static Python value, so the modules live happily in a
graph passed through ``nnx.jit``, ``nnx.remat``, ``nnx.scan``, ``nnx.vmap`` or ``nnx.grad``.

``dtype`` follows Flax's convention, the dtype of the computation and the output: the
features are cast to ``dtype`` when it is given and kept as they are when it is ``None``.
Boxes are never cast (their coordinates are computed in float32, or float64 for float64
features, as the functions do).

A Faster R-CNN box head (in a module's ``__init__``: ``self.pool = RoIAlign(7, spatial_scale=1/16,
sampling_ratio=2)``, ``self.fc = nnx.Linear(7 * 7 * C, 1024, rngs=rngs)``, ``self.cls``,
``self.box``; then in ``__call__``)::

    x = self.pool(features, boxes)                               # [B, R, 7, 7, C]
    x = nnx.relu(self.fc(x.reshape(x.shape[:-3] + (-1,))))
    scores, deltas = self.cls(x), self.box(x)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax.numpy as jnp
from flax import nnx

from jax_roi import ops

__all__ = ["MultiScaleRoIAlign", "RoIAlign", "RoIPool", "RoIWarp"]

Size = Union[int, Sequence[int]]


def _cast(x, dtype):
    return x if dtype is None else jnp.asarray(x, dtype)


def _size(output_size):
    return tuple(output_size) if isinstance(output_size, list) else output_size


class RoIAlign(nnx.Module):
    """RoIAlign (Mask R-CNN) as an nnx module: :func:`jax_roi.roi_align` with these arguments.

    Args:
      output_size: ``int`` or ``(oh, ow)``.
      spatial_scale: feature pixels per image pixel (1 / stride).
      sampling_ratio: samples per bin side; ``<= 0`` is adaptive.
      aligned: the half-pixel offset of Detectron2 (True) or the original Mask R-CNN (False).
      reduction: ``"avg"`` or ``"max"``.
      data_format: ``"NHWC"`` or ``"NCHW"``.
      implementation: ``None`` (fastest built), ``"xla"`` or ``"ffi"``.
      dtype: the dtype of the computation and output; the features are cast to it (``None``:
        kept).

    Example, a box head (``self.pool = RoIAlign(7, spatial_scale=1 / 16, sampling_ratio=2)``,
    ``self.fc``, ``self.cls``, ``self.box`` ``nnx.Linear`` layers)::

        x = self.pool(features, boxes)                               # [B, R, 7, 7, C]
        x = nnx.relu(self.fc(x.reshape(x.shape[:-3] + (-1,))))
        scores, deltas = self.cls(x), self.box(x)
    """

    def __init__(self, output_size: Size, *, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 aligned: bool = True, reduction: str = "avg", data_format: str = "NHWC",
                 implementation: Optional[str] = None, dtype: Any = None):
        self.output_size = _size(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.reduction = reduction
        self.data_format = data_format
        self.implementation = implementation
        self.dtype = dtype

    def __call__(self, features, boxes):
        """``features`` ``[B, H, W, C]`` with ``boxes`` ``[K, 5]`` rois or ``[B, R, 4]``; see
        :func:`jax_roi.roi_align`."""
        return ops.roi_align(_cast(features, self.dtype), boxes, self.output_size,
                             spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
                             aligned=self.aligned, reduction=self.reduction,
                             data_format=self.data_format, implementation=self.implementation)


class RoIWarp(nnx.Module):
    """RoIWarp (MNC) as an nnx module: :func:`jax_roi.roi_warp` with these arguments.

    Args: as :class:`RoIAlign`, without ``aligned`` (RoIWarp is the legacy grid on the
    rounded box).

    Example, a box head (``self.pool = RoIWarp(7, spatial_scale=1 / 16, sampling_ratio=2)``)::

        x = self.pool(features, boxes)                               # [B, R, 7, 7, C]
        x = nnx.relu(self.fc(x.reshape(x.shape[:-3] + (-1,))))
        scores, deltas = self.cls(x), self.box(x)
    """

    def __init__(self, output_size: Size, *, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 reduction: str = "avg", data_format: str = "NHWC", implementation: Optional[str] = None,
                 dtype: Any = None):
        self.output_size = _size(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.reduction = reduction
        self.data_format = data_format
        self.implementation = implementation
        self.dtype = dtype

    def __call__(self, features, boxes):
        """See :func:`jax_roi.roi_warp`."""
        return ops.roi_warp(_cast(features, self.dtype), boxes, self.output_size,
                            spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
                            reduction=self.reduction, data_format=self.data_format,
                            implementation=self.implementation)


class RoIPool(nnx.Module):
    """RoIPool (Fast R-CNN) as an nnx module: :func:`jax_roi.roi_pool` with these arguments.

    Args:
      output_size, spatial_scale, data_format, implementation, dtype: as :class:`RoIAlign`.
      binning: ``"caffe"`` (torchvision, the default) or ``"floor"``.

    Example, a Fast R-CNN box head (``self.pool = RoIPool(7, spatial_scale=1 / 16)``)::

        x = self.pool(features, boxes)                               # [B, R, 7, 7, C]
        x = nnx.relu(self.fc(x.reshape(x.shape[:-3] + (-1,))))
        scores, deltas = self.cls(x), self.box(x)
    """

    def __init__(self, output_size: Size, *, spatial_scale: float = 1.0, binning: str = "caffe",
                 data_format: str = "NHWC", implementation: Optional[str] = None, dtype: Any = None):
        self.output_size = _size(output_size)
        self.spatial_scale = spatial_scale
        self.binning = binning
        self.data_format = data_format
        self.implementation = implementation
        self.dtype = dtype

    def __call__(self, features, boxes):
        """See :func:`jax_roi.roi_pool`."""
        return ops.roi_pool(_cast(features, self.dtype), boxes, self.output_size,
                            spatial_scale=self.spatial_scale, binning=self.binning,
                            data_format=self.data_format, implementation=self.implementation)


class MultiScaleRoIAlign(nnx.Module):
    """Multi-level (FPN) RoIAlign as an nnx module: :func:`jax_roi.multiscale_roi_align`.

    Args:
      output_size: ``int`` or ``(oh, ow)``.
      spatial_scales: one power of two per level, finest first, e.g. ``(1/4, 1/8, 1/16, 1/32)``.
      sampling_ratio, aligned, data_format, implementation: as :class:`RoIAlign`
        (torchvision's module uses ``aligned=False``).
      canonical_scale, canonical_level: ``s0`` and ``k0`` of the FPN level rule.
      dtype: the dtype of the computation and output; every level is cast to it (``None``:
        kept).

    Example, an FPN box head (``self.pool = MultiScaleRoIAlign(7, spatial_scales=(1/4, 1/8,
    1/16, 1/32), sampling_ratio=2)``; ``levels`` a list of ``[B, Hl, Wl, C]``, finest first)::

        x = self.pool(levels, boxes)                                 # [B, R, 7, 7, C]
        x = nnx.relu(self.fc(x.reshape(x.shape[:-3] + (-1,))))
        scores, deltas = self.cls(x), self.box(x)
    """

    def __init__(self, output_size: Size, *, spatial_scales: Sequence[float], sampling_ratio: int = -1,
                 aligned: bool = True, canonical_scale: float = 224, canonical_level: int = 4,
                 data_format: str = "NHWC", implementation: Optional[str] = None, dtype: Any = None):
        self.output_size = _size(output_size)
        # A tuple, not a list: a static attribute of the module's graph.
        self.spatial_scales = tuple(spatial_scales) if isinstance(spatial_scales, (list, tuple)) else spatial_scales
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.data_format = data_format
        self.implementation = implementation
        self.dtype = dtype

    def __call__(self, features, boxes):
        """``features`` a list of levels; see :func:`jax_roi.multiscale_roi_align`."""
        levels = [_cast(f, self.dtype) for f in features] if isinstance(features, (list, tuple)) else features
        return ops.multiscale_roi_align(levels, boxes, self.output_size, spatial_scales=self.spatial_scales,
                                        sampling_ratio=self.sampling_ratio, aligned=self.aligned,
                                        canonical_scale=self.canonical_scale,
                                        canonical_level=self.canonical_level,
                                        data_format=self.data_format,
                                        implementation=self.implementation)
