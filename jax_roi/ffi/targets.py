"""The kernels' FFI targets: names, operands and attributes, in one table.

``xla_ffi/module.cc`` hands out the handlers under these names (the same on every
platform; the platform is given at registration). Layouts are NHWC; rois are ``[K, 5]``
in float32, or float64 for float64 features.

``jax_roi_roi_align_fwd(rois, level[K] i32, *features_l) -> out [K, oh, ow, C]``
    attributes ``spatial_scales`` (f64 array, one per level), ``sampling_ratio``,
    ``aligned``, ``reduction`` (0 avg, 1 max), ``quantize`` (int64). Roi ``k`` reads level
    ``level[k]``.
``jax_roi_roi_align_bwd(cot, rois, level, *features_l) -> (d_rois [K, 5], *d_features_l)``
    the same attributes and ``rois_grad``; ``d_features_l`` in the accumulation dtype has
    ``m*B`` images when asked for (``m >= 1``): roi batch index ``b`` reads image ``b % B``
    and writes image ``b``, so per-example gradients of a shared map need no copy of it.
``jax_roi_roi_pool_fwd(rois, features) -> out``, ``jax_roi_roi_pool_bwd(cot, rois,
features) -> d_features``: attributes ``spatial_scale`` (f64), ``binning`` (0 caffe, 1 floor).
``jax_roi_ps_roi_align_fwd(rois, features) -> out [K, oh, ow, C / (oh*ow)]``,
``jax_roi_ps_roi_align_bwd(cot, rois, features) -> (d_rois, d_features)``: attributes
``spatial_scale`` (f64), ``sampling_ratio`` and on the backward ``rois_grad``.
``jax_roi_ps_roi_pool_fwd(rois, features) -> out``, ``jax_roi_ps_roi_pool_bwd(cot, rois,
features) -> d_features``: attribute ``spatial_scale``. Both position-sensitive backwards
write ``m*B`` gradient images as roi_align's.
``jax_roi_roi_align_rotated_fwd(rois [K, 6], features) -> out [K, oh, ow, C]``,
``jax_roi_roi_align_rotated_bwd(cot, rois, features) -> (d_rois [K, 6], d_features)``:
rois ``(batch, x_ctr, y_ctr, w, h, angle)``, attributes ``spatial_scale`` (f64),
``sampling_ratio``, ``aligned`` and on the backward ``rois_grad``; ``m*B`` gradient images
as roi_align's.

The CUDA backward targets (and their host emulation) take one more attribute,
``deterministic`` (int64): 0 scatters the feature gradient with atomics, 1 gathers it per
feature tile in a fixed order (bitwise reproducible). The CPU kernels are deterministic and
take no such attribute.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FORWARD = {"align": "jax_roi_roi_align_fwd", "pool": "jax_roi_roi_pool_fwd",
           "ps_align": "jax_roi_ps_roi_align_fwd", "ps_pool": "jax_roi_ps_roi_pool_fwd",
           "rotated": "jax_roi_roi_align_rotated_fwd"}
BACKWARD = {"align": "jax_roi_roi_align_bwd", "pool": "jax_roi_roi_pool_bwd",
            "ps_align": "jax_roi_ps_roi_align_bwd", "ps_pool": "jax_roi_ps_roi_pool_bwd",
            "rotated": "jax_roi_roi_align_rotated_bwd"}

_REDUCTIONS = {"avg": 0, "max": 1}
_BINNINGS = {"caffe": 0, "floor": 1}


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """Every static attribute of one kernel op (hashable: a primitive parameter).

    ``kind`` is ``"align"`` (RoIAlign, RoIWarp with ``quantize``, and the multi-level
    form, one scale per level), ``"pool"`` (RoIPool, one scale), ``"ps_align"`` or
    ``"ps_pool"`` (the position-sensitive ops, one scale: ``C_out = C / (oh*ow)`` output
    channels), ``"rotated"`` (rotated RoIAlign, one scale, ``[K, 6]`` rois)."""

    kind: str
    output_size: tuple[int, int]
    scales: tuple[float, ...]
    sampling_ratio: int = 0
    aligned: bool = False
    reduction: str = "avg"
    quantize: bool = False
    binning: str = "caffe"
    deterministic: bool = False

    @property
    def position_sensitive(self) -> bool:
        return self.kind in ("ps_align", "ps_pool")

    def output_channels(self, channels: int) -> int:
        """The output's channels for maps of ``channels``: each position-sensitive bin reads
        its own group of ``C / (oh*ow)``."""
        if self.position_sensitive:
            return channels // (self.output_size[0] * self.output_size[1])
        return channels

    @property
    def linear_in_features(self) -> bool:
        """Average RoIAlign / RoIWarp, both position-sensitive ops and rotated RoIAlign
        (averages): the forward kernel is also the features' tangent."""
        return (self.kind == "align" and self.reduction == "avg") or self.position_sensitive or self.kind == "rotated"

    @property
    def has_box_gradient(self) -> bool:
        """RoIWarp's rounding and RoIPool's (and ps_roi_pool's) whole cells are flat in the
        boxes."""
        return (self.kind == "align" and not self.quantize) or self.kind in ("ps_align", "rotated")

    @property
    def backward_returns_rois(self) -> bool:
        """Whether the backward target has a ``d_rois`` result (the ops with box gradients)."""
        return self.kind in ("align", "ps_align", "rotated")


def operands(cfg: OpConfig, rois, level, features):
    """The target's operands: the single-map ops' (RoIPool, the position-sensitive ops)
    take no level."""
    return (rois, level, *features) if cfg.kind == "align" else (rois, features[0])


def attributes(cfg: OpConfig, *, backward: bool, rois_grad: bool = False, device_kernel: bool = False):
    """Keyword attributes of the forward or backward target. ``device_kernel``: the CUDA
    kernels (or their emulation), whose backward takes ``deterministic``."""
    if cfg.kind == "align":
        attrs = dict(spatial_scales=np.asarray(cfg.scales, np.float64),
                     sampling_ratio=np.int64(cfg.sampling_ratio), aligned=np.int64(cfg.aligned),
                     reduction=np.int64(_REDUCTIONS[cfg.reduction]), quantize=np.int64(cfg.quantize))
        if backward:
            attrs["rois_grad"] = np.int64(bool(rois_grad))
    elif cfg.kind == "ps_align":
        attrs = dict(spatial_scale=np.float64(cfg.scales[0]), sampling_ratio=np.int64(cfg.sampling_ratio))
        if backward:
            attrs["rois_grad"] = np.int64(bool(rois_grad))
    elif cfg.kind == "rotated":
        attrs = dict(spatial_scale=np.float64(cfg.scales[0]), sampling_ratio=np.int64(cfg.sampling_ratio),
                     aligned=np.int64(cfg.aligned))
        if backward:
            attrs["rois_grad"] = np.int64(bool(rois_grad))
    elif cfg.kind == "ps_pool":
        attrs = dict(spatial_scale=np.float64(cfg.scales[0]))
    else:
        attrs = dict(spatial_scale=np.float64(cfg.scales[0]), binning=np.int64(_BINNINGS[cfg.binning]))
    if backward and device_kernel:
        attrs["deterministic"] = np.int64(bool(cfg.deterministic))
    return attrs
