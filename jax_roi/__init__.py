"""jax_roi: region-of-interest feature extraction for JAX.

RoIPool (Fast R-CNN), RoIWarp (MNC), RoIAlign (Mask R-CNN) and its multi-level (FPN) form,
position-sensitive RoIAlign / RoIPool (R-FCN) and rotated RoIAlign (oriented boxes),
as pure JAX (``implementation="xla"``) and as XLA FFI kernels (``"ffi"``) with one meaning,
defined in docs/semantics.md.
"""

from jax_roi.checks import check_boxes
from jax_roi.ops import (multiscale_roi_align, ps_roi_align, ps_roi_pool, roi_align, roi_align_rotated, roi_pool,
                         roi_warp)
from jax_roi.pyramid import fpn_levels

__version__ = "0.1.0"

__all__ = ["check_boxes", "fpn_levels", "multiscale_roi_align", "ps_roi_align", "ps_roi_pool", "roi_align",
           "roi_align_rotated", "roi_pool", "roi_warp"]
