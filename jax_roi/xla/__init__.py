"""The pure-JAX implementation: the reference path, on every platform, differentiable by
autodiff with respect to features and boxes."""

from jax_roi.xla.roi_align import multilevel_roi_align, roi_align
from jax_roi.xla.roi_pool import roi_pool

__all__ = ["multilevel_roi_align", "roi_align", "roi_pool"]
