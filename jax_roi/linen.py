"""``flax.linen`` modules for the jax_roi ops.

Each module is a thin, stateless wrapper (no parameters, no variables) around the function of
the same name in :mod:`jax_roi`: its attributes are the function's keyword arguments and
``module(features, boxes)`` returns exactly ``jax_roi.<op>(features, boxes, ...)``. The
semantics (box forms, layouts, gradients) are those of the functions; see ``SEMANTICS.md``.

``dtype`` follows Flax's convention, the dtype of the computation and the output: the
features are cast to ``dtype`` when it is given and kept as they are when it is ``None``.
Boxes are never cast (their coordinates are computed in float32, or float64 for float64
features, as the functions do).

A Faster R-CNN box head::

    x = RoIAlign(7, spatial_scale=1 / 16, sampling_ratio=2)(features, boxes)   # [B, R, 7, 7, C]
    x = nn.relu(nn.Dense(1024)(x.reshape(x.shape[:-3] + (-1,))))
    scores, deltas = nn.Dense(num_classes)(x), nn.Dense(4 * num_classes)(x)

The modules are usable bound (as submodules inside ``@nn.compact``), on their own through
``module.apply({}, features, boxes)``, and under ``nn.jit``, ``nn.remat``, ``nn.scan``,
``nn.vmap`` and ``jax.grad``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from jax_roi import ops

__all__ = ["MultiScaleRoIAlign", "RoIAlign", "RoIPool", "RoIWarp"]

Size = Union[int, Sequence[int]]


def _cast(x, dtype):
    return x if dtype is None else jnp.asarray(x, dtype)


def _size(output_size):
    return tuple(output_size) if isinstance(output_size, list) else output_size


class RoIAlign(nn.Module):
    """RoIAlign (Mask R-CNN) as a Flax module: :func:`jax_roi.roi_align` with these attributes.

    Attributes:
      output_size: ``int`` or ``(oh, ow)``.
      spatial_scale: feature pixels per image pixel (1 / stride).
      sampling_ratio: samples per bin side; ``<= 0`` is adaptive.
      aligned: the half-pixel offset of Detectron2 (True) or the original Mask R-CNN (False).
      reduction: ``"avg"`` or ``"max"``.
      data_format: ``"NHWC"`` or ``"NCHW"``.
      implementation: ``None`` (fastest built), ``"xla"`` or ``"ffi"``.
      dtype: the dtype of the computation and output; the features are cast to it (``None``:
        kept).

    Example, a box head (``boxes`` ``[B, R, 4]`` in image pixels, ``features`` ``[B, H, W, C]``)::

        x = RoIAlign(7, spatial_scale=1 / 16, sampling_ratio=2)(features, boxes)   # [B, R, 7, 7, C]
        x = nn.relu(nn.Dense(1024)(x.reshape(x.shape[:-3] + (-1,))))
        scores, deltas = nn.Dense(num_classes)(x), nn.Dense(4 * num_classes)(x)
    """

    output_size: Size
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    aligned: bool = True
    reduction: str = "avg"
    data_format: str = "NHWC"
    implementation: Optional[str] = None
    dtype: Any = None

    def __call__(self, features, boxes):
        """``features`` ``[B, H, W, C]`` with ``boxes`` ``[K, 5]`` rois or ``[B, R, 4]``; see
        :func:`jax_roi.roi_align`."""
        return ops.roi_align(_cast(features, self.dtype), boxes, _size(self.output_size),
                             spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
                             aligned=self.aligned, reduction=self.reduction,
                             data_format=self.data_format, implementation=self.implementation)


class RoIWarp(nn.Module):
    """RoIWarp (MNC) as a Flax module: :func:`jax_roi.roi_warp` with these attributes.

    Attributes: as :class:`RoIAlign`, without ``aligned`` (RoIWarp is the legacy grid on the
    rounded box).

    Example, a box head::

        x = RoIWarp(7, spatial_scale=1 / 16, sampling_ratio=2)(features, boxes)   # [B, R, 7, 7, C]
        x = nn.relu(nn.Dense(1024)(x.reshape(x.shape[:-3] + (-1,))))
        scores, deltas = nn.Dense(num_classes)(x), nn.Dense(4 * num_classes)(x)
    """

    output_size: Size
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    reduction: str = "avg"
    data_format: str = "NHWC"
    implementation: Optional[str] = None
    dtype: Any = None

    def __call__(self, features, boxes):
        """See :func:`jax_roi.roi_warp`."""
        return ops.roi_warp(_cast(features, self.dtype), boxes, _size(self.output_size),
                            spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
                            reduction=self.reduction, data_format=self.data_format,
                            implementation=self.implementation)


class RoIPool(nn.Module):
    """RoIPool (Fast R-CNN) as a Flax module: :func:`jax_roi.roi_pool` with these attributes.

    Attributes:
      output_size, spatial_scale, data_format, implementation, dtype: as :class:`RoIAlign`.
      binning: ``"caffe"`` (torchvision, the default) or ``"floor"``.

    Example, a Fast R-CNN box head::

        x = RoIPool(7, spatial_scale=1 / 16)(features, boxes)   # [B, R, 7, 7, C]
        x = nn.relu(nn.Dense(1024)(x.reshape(x.shape[:-3] + (-1,))))
        scores, deltas = nn.Dense(num_classes)(x), nn.Dense(4 * num_classes)(x)
    """

    output_size: Size
    spatial_scale: float = 1.0
    binning: str = "caffe"
    data_format: str = "NHWC"
    implementation: Optional[str] = None
    dtype: Any = None

    def __call__(self, features, boxes):
        """See :func:`jax_roi.roi_pool`."""
        return ops.roi_pool(_cast(features, self.dtype), boxes, _size(self.output_size),
                            spatial_scale=self.spatial_scale, binning=self.binning,
                            data_format=self.data_format, implementation=self.implementation)


class MultiScaleRoIAlign(nn.Module):
    """Multi-level (FPN) RoIAlign as a Flax module: :func:`jax_roi.multiscale_roi_align`.

    Attributes:
      output_size: ``int`` or ``(oh, ow)``.
      spatial_scales: one power of two per level, finest first, e.g. ``(1/4, 1/8, 1/16, 1/32)``.
      sampling_ratio, aligned, data_format, implementation: as :class:`RoIAlign`
        (torchvision's module uses ``aligned=False``).
      canonical_scale, canonical_level: ``s0`` and ``k0`` of the FPN level rule.
      dtype: the dtype of the computation and output; every level is cast to it (``None``:
        kept).

    Example, an FPN box head (``levels`` a list of ``[B, Hl, Wl, C]``, finest first)::

        x = MultiScaleRoIAlign(7, spatial_scales=(1/4, 1/8, 1/16, 1/32), sampling_ratio=2)(levels, boxes)
        x = nn.relu(nn.Dense(1024)(x.reshape(x.shape[:-3] + (-1,))))
        scores, deltas = nn.Dense(num_classes)(x), nn.Dense(4 * num_classes)(x)
    """

    output_size: Size
    spatial_scales: Sequence[float]
    sampling_ratio: int = -1
    aligned: bool = True
    canonical_scale: float = 224
    canonical_level: int = 4
    data_format: str = "NHWC"
    implementation: Optional[str] = None
    dtype: Any = None

    def __call__(self, features, boxes):
        """``features`` a list of levels; see :func:`jax_roi.multiscale_roi_align`."""
        levels = [_cast(f, self.dtype) for f in features] if isinstance(features, (list, tuple)) else features
        return ops.multiscale_roi_align(levels, boxes, _size(self.output_size),
                                        spatial_scales=tuple(self.spatial_scales),
                                        sampling_ratio=self.sampling_ratio, aligned=self.aligned,
                                        canonical_scale=self.canonical_scale,
                                        canonical_level=self.canonical_level,
                                        data_format=self.data_format,
                                        implementation=self.implementation)
