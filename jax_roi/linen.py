"""``flax.linen`` modules for the jax_roi ops: ``RoIAlign``, ``RoIWarp``, ``RoIPool``,
``MultiScaleRoIAlign``, ``PSRoIAlign``, ``PSRoIPool`` and ``RoIAlignRotated``.

Each module is a thin, stateless wrapper (no parameters, no variables) around the function of
the same name in :mod:`jax_roi`: its attributes are the function's keyword arguments (and
``output_size``, which may be given positionally), and ``module(features, boxes)`` returns
exactly ``jax_roi.<op>(features, boxes, output_size, ...)``. The semantics (box forms,
layouts, gradients) are the functions'; see ``docs/semantics.md``.

The classes are generated from ``jax_roi._module_spec``, the one table the ``flax.nnx``
modules (:mod:`jax_roi.nnx`) are generated from too, so both have the same attributes,
defaults and documentation.

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


import flax.linen as nn

from jax_roi import _module_spec as _spec

__all__ = ["MultiScaleRoIAlign", "PSRoIAlign", "PSRoIPool", "RoIAlign", "RoIAlignRotated", "RoIPool", "RoIWarp"]


def _make(spec: _spec.OpSpec) -> type:
    annotations, namespace = {}, {}
    for a in spec.attrs:
        annotations[a.name] = a.type
        if a.default is not _spec.REQUIRED:
            namespace[a.name] = a.default
    # Required attributes come first (dataclass order), the rest keep the table's order.
    order = [a for a in spec.attrs if a.default is _spec.REQUIRED] + \
            [a for a in spec.attrs if a.default is not _spec.REQUIRED]
    namespace["__annotations__"] = {a.name: annotations[a.name] for a in order}

    def __call__(self, features, boxes):
        return _spec.call(spec, {a.name: getattr(self, a.name) for a in spec.attrs}, features, boxes)

    __call__.__doc__ = _spec.call_docstring(spec)

    namespace.update(__call__=__call__, __module__=__name__, __qualname__=spec.cls_name,
                     __doc__=_spec.docstring(spec, "linen"))
    return type(spec.cls_name, (nn.Module,), namespace)


RoIAlign = _make(_spec.SPECS["RoIAlign"])
RoIWarp = _make(_spec.SPECS["RoIWarp"])
RoIPool = _make(_spec.SPECS["RoIPool"])
MultiScaleRoIAlign = _make(_spec.SPECS["MultiScaleRoIAlign"])
PSRoIAlign = _make(_spec.SPECS["PSRoIAlign"])
PSRoIPool = _make(_spec.SPECS["PSRoIPool"])
RoIAlignRotated = _make(_spec.SPECS["RoIAlignRotated"])

