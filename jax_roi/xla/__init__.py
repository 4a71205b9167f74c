"""The pure-JAX implementation: the reference path, on every platform, differentiable by
autodiff with respect to features and boxes. Average RoIAlign runs in the formulation
chosen per platform (``formulation.py``)."""

from jax_roi.xla.formulation import FORMULATIONS, multilevel_roi_align, roi_align
from jax_roi.xla.roi_pool import roi_pool

__all__ = ["FORMULATIONS", "multilevel_roi_align", "roi_align", "roi_pool"]
