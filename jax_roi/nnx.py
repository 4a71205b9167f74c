"""``flax.nnx`` modules for the jax_roi ops: ``RoIAlign``, ``RoIWarp``, ``RoIPool``,
``MultiScaleRoIAlign``, ``PSRoIAlign``, ``PSRoIPool`` and ``RoIAlignRotated``.

Each module is a thin, stateless wrapper (no ``nnx.Param``, no ``nnx.Variable``) around the
function of the same name in :mod:`jax_roi`: the constructor takes ``output_size``
(positionally) and the function's keyword arguments, and ``module(features, boxes)`` returns
exactly ``jax_roi.<op>(features, boxes, output_size, ...)``. The semantics (box forms,
layouts, gradients) are the functions'; see ``docs/semantics.md``. Every attribute is a static
Python value, so the modules live happily in a graph passed through ``nnx.jit``,
``nnx.remat``, ``nnx.scan``, ``nnx.vmap`` or ``nnx.grad``.

The classes are generated from ``jax_roi._module_spec``, the one table the ``flax.linen``
modules (:mod:`jax_roi.linen`) are generated from too, so both have the same attributes,
defaults and documentation.

``dtype`` follows Flax's convention, the dtype of the computation and the output: the
features are cast to ``dtype`` when it is given and kept as they are when it is ``None``.
Boxes are never cast.

A Faster R-CNN box head (in a module's ``__init__``: ``self.pool = RoIAlign(7, spatial_scale=1/16,
sampling_ratio=2)``, ``self.fc = nnx.Linear(7 * 7 * C, 1024, rngs=rngs)``, ``self.cls``,
``self.box``; then in ``__call__``)::

    x = self.pool(features, boxes)                               # [B, R, 7, 7, C]
    x = nnx.relu(self.fc(x.reshape(x.shape[:-3] + (-1,))))
    scores, deltas = self.cls(x), self.box(x)
"""

from __future__ import annotations

import inspect

from flax import nnx

from jax_roi import _module_spec as _spec

__all__ = ["MultiScaleRoIAlign", "PSRoIAlign", "PSRoIPool", "RoIAlign", "RoIAlignRotated", "RoIPool", "RoIWarp"]


def _make(spec: _spec.OpSpec) -> type:
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for a in spec.attrs:
        kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD if a.name == "output_size"
                else inspect.Parameter.KEYWORD_ONLY)
        default = inspect.Parameter.empty if a.default is _spec.REQUIRED else a.default
        params.append(inspect.Parameter(a.name, kind, default=default, annotation=a.type))
    signature = inspect.Signature(params)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for a in spec.attrs:
            setattr(self, a.name, _spec.normalize(a.name, bound.arguments[a.name]))

    __init__.__signature__ = signature
    __init__.__qualname__ = f"{spec.cls_name}.__init__"

    def __call__(self, features, boxes):
        return _spec.call(spec, {a.name: getattr(self, a.name) for a in spec.attrs}, features, boxes)

    __call__.__doc__ = _spec.call_docstring(spec)

    __call__.__qualname__ = f"{spec.cls_name}.__call__"
    namespace = dict(__init__=__init__, __call__=__call__, __module__=__name__, __qualname__=spec.cls_name,
                     __doc__=_spec.docstring(spec, "nnx"))
    cls = type(spec.cls_name, (nnx.Module,), namespace)
    cls.__signature__ = signature.replace(parameters=params[1:])  # what help() and inspect show
    return cls


RoIAlign = _make(_spec.SPECS["RoIAlign"])
RoIWarp = _make(_spec.SPECS["RoIWarp"])
RoIPool = _make(_spec.SPECS["RoIPool"])
MultiScaleRoIAlign = _make(_spec.SPECS["MultiScaleRoIAlign"])
PSRoIAlign = _make(_spec.SPECS["PSRoIAlign"])
PSRoIPool = _make(_spec.SPECS["PSRoIPool"])
RoIAlignRotated = _make(_spec.SPECS["RoIAlignRotated"])
