r"""Multi-level (FPN) RoIAlign: each box is pooled once, on the level its size picks.

The level of a box of area :math:`A` (image pixels) is, as in FPN and torchvision's
``MultiScaleRoIAlign``,

.. math::  k = \mathrm{clip}\big(\lfloor k_0 + \log_2(\sqrt{A} / s_0) + 10^{-6} \rfloor,\;
           k_{\min},\; k_{\max}\big)

with :math:`s_0` = ``canonical_scale`` (224), :math:`k_0` = ``canonical_level`` (4) and
level ``k`` having ``spatial_scale = 2**-k``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

from jax_roi import _inputs


def level_range(spatial_scales: Sequence[float]) -> tuple[int, int]:
    """``(k_min, k_max)`` of already-checked scales (``_inputs.spatial_scales``)."""
    return int(round(-math.log2(spatial_scales[0]))), int(round(-math.log2(spatial_scales[-1])))


def fpn_levels(boxes, spatial_scales: Sequence[float], *, canonical_scale: float = 224.0,
               canonical_level: int = 4):
    """Index (into ``spatial_scales``) of the level each box goes to.

    Args:
      boxes: ``[..., 4]`` boxes ``(x1, y1, x2, y2)`` in image pixels.
      spatial_scales: one power of two per level, finest first (e.g. ``[1/4, 1/8, 1/16, 1/32]``).

    Returns:
      int32 ``[...]`` in ``[0, len(spatial_scales))``; ``-1`` for a box whose area is not a
      finite non-negative number (it is pooled to zeros).
    """
    spatial_scales = _inputs.spatial_scales(spatial_scales)
    k_min, k_max = level_range(spatial_scales)
    boxes = jnp.asarray(boxes)
    if not jnp.issubdtype(boxes.dtype, jnp.floating):
        boxes = boxes.astype(jnp.float32)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes: expected [..., 4] boxes (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    ok = jnp.isfinite(area) & (area >= 0)
    size = jnp.sqrt(jnp.where(ok, area, 1))
    k = jnp.floor(canonical_level + jnp.log2(size / canonical_scale) + 1e-6)
    k = jnp.clip(k, k_min, k_max)
    return jnp.where(ok, k - k_min, -1).astype(jnp.int32)
