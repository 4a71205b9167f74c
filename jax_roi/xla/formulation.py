"""Which formulation of average RoIAlign the pure-JAX path runs, per platform.

Average RoIAlign / RoIWarp and the multi-level form have two pure-JAX formulations with
one meaning:

* ``"gather"`` (``roi_align.py``): per-axis tap tables and one gather-sum. It reads only
  the samples' neighbours, which is the fastest on CPU and GPU.
* ``"matmul"`` (``matmul.py``): per-box interpolation matrices contracted with the map in
  two ``dot_general``\\ s; no gather and no scatter forward or backward. It spends far
  more arithmetic, on the matrix units, which is what a TPU runs well (its gathers are
  slow).

``formulation=None`` picks per platform when the computation is lowered
(``lax.platform_dependent``): ``"matmul"`` on TPU, ``"gather"`` elsewhere. Choosing at
lowering rather than at trace time keeps a function traced once correct for every
platform it is lowered or exported for. Only the chosen branch is lowered.

The max reduction and RoIPool are not linear in the map, have no dense form and always
gather.
"""

from __future__ import annotations

import functools

from jax import lax

from jax_roi.xla import matmul
from jax_roi.xla.roi_align import multilevel_roi_align as gather_multilevel_roi_align
from jax_roi.xla.roi_align import roi_align as gather_roi_align

FORMULATIONS = ("gather", "matmul")


def _choose(formulation, by_gather, by_matmul, *args):
    if formulation == "gather":
        return by_gather(*args)
    if formulation == "matmul":
        return by_matmul(*args)
    return lax.platform_dependent(*args, tpu=by_matmul, default=by_gather)


def roi_align(features, rois, output_size, *, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
              reduction="avg", quantize=False, formulation=None):
    """Canonical-form RoIAlign (``quantize=True``: RoIWarp) in the chosen formulation.
    Returns ``[K, oh, ow, C]`` in the features' dtype."""
    common = dict(output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                  aligned=aligned, quantize=quantize)
    by_gather = functools.partial(gather_roi_align, reduction=reduction, **common)
    if reduction != "avg":  # the max has no matmul form (the public API refuses one)
        return by_gather(features, rois)
    return _choose(formulation, by_gather, functools.partial(matmul.roi_align_matmul, **common), features, rois)


def multilevel_roi_align(levels, rois, level_ids, output_size, *, spatial_scales, sampling_ratio=-1,
                         aligned=True, formulation=None):
    """Average RoIAlign of each box on its own pyramid level, in the chosen formulation.
    Returns ``[K, oh, ow, C]`` in the levels' dtype."""
    common = dict(output_size=output_size, spatial_scales=spatial_scales, sampling_ratio=sampling_ratio,
                  aligned=aligned)

    def by(fn):
        return lambda levels, rois, level_ids: fn(list(levels), rois, level_ids, **common)

    return _choose(formulation, by(gather_multilevel_roi_align), by(matmul.multilevel_roi_align_matmul),
                   tuple(levels), rois, level_ids)
