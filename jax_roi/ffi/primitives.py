"""The kernel ops as JAX primitives: what they return (abstract evaluation) and how they
lower on each platform.

Three primitives carry every kernel op (``OpConfig`` says which one and its attributes):

``forward(rois, level, *features) -> out``
    the forward target.
``backward(cot, rois, level, *features) -> (d_rois, *d_features)``
    the backward target (features' gradients in the accumulation dtype, ``factor`` copies
    per map: see ``targets``).
``tangent(d_rois, *d_features, rois, level, *features) -> d_out``
    the forward's derivative along ``(d_rois, d_features)``; linear in them, and its
    transpose is ``backward`` (``differentiation``), so reverse mode runs the backward
    kernel while forward mode evaluates this.

Each comes in two forms: ungrouped (rois ``[K, 5]``, maps ``[B, H, W, C]``) and
``grouped`` (a leading group axis on every operand and result: ``[G, K, 5]``, ``[G, B, H,
W, C]``; group ``g``'s rois read group ``g``'s maps). ``jax.vmap`` of the per-image box form
gives the grouped form (``batching``); it lowers to ONE kernel call over all groups, the
groups folded into the image axis, wrapped in ``custom_partitioning`` so that a
group-sharded ``jit`` runs each device's groups alone (no all-gather). Differentiation
rules live on the primitives, so the partitioning sits inside every derivative.

Lowering: on CPU the CPU kernels (or, with ``JAX_ROI_EMULATE_CUDA=1``, the CUDA kernels'
code run on the host), on CUDA the CUDA kernels where built, elsewhere the pure-JAX path
(``fallback``). The kernels' custom calls carry no compatibility guarantee, so exporting
them is refused with an error that points to ``implementation="xla"``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax._src.sharding_impls import ShardingContext

from jax_roi.ffi import _loader, fallback, partition
from jax_roi.ffi.folding import fold, fold_groups, ungroup_gradient, unfold
from jax_roi.ffi.targets import BACKWARD, FORWARD, OpConfig, attributes, operands

forward_p = Primitive("jax_roi_kernel_forward")
backward_p = Primitive("jax_roi_kernel_backward")
backward_p.multiple_results = True
tangent_p = Primitive("jax_roi_kernel_tangent")


# ---------------------------------------------------------------------------------------
# Binding
# ---------------------------------------------------------------------------------------

def forward(rois, level, features, *, cfg: OpConfig, grouped: bool = False):
    return forward_p.bind(rois, level, *features, cfg=cfg, grouped=grouped)


def backward(cot, rois, level, features, *, cfg: OpConfig, grouped: bool, rois_grad: bool, factor: int = 1):
    res = backward_p.bind(cot, rois, level, *features, cfg=cfg, grouped=grouped, rois_grad=bool(rois_grad),
                          factor=int(factor))
    return res[0], tuple(res[1:])


def tangent(d_rois, d_features, rois, level, features, *, cfg: OpConfig, grouped: bool, tangents):
    return tangent_p.bind(d_rois, *d_features, rois, level, *features, cfg=cfg, grouped=grouped,
                          tangents=tuple(tangents))


def split_tangent_args(args):
    """``(d_rois, d_features, rois, level, features)`` of a tangent primitive's operands."""
    levels = (len(args) - 3) // 2
    return args[0], args[1:1 + levels], args[1 + levels], args[2 + levels], args[3 + levels:]


# ---------------------------------------------------------------------------------------
# Abstract evaluation
# ---------------------------------------------------------------------------------------

def _out_aval(rois, features, cfg):
    oh, ow = cfg.output_size
    return jax.core.ShapedArray(rois.shape[:-1] + (oh, ow, cfg.output_channels(features[0].shape[-1])),
                                features[0].dtype)


def _forward_abstract(rois, level, *features, cfg, grouped):
    return _out_aval(rois, features, cfg)


def _backward_abstract(cot, rois, level, *features, cfg, grouped, rois_grad, factor):
    acc = fallback.accumulation_dtype(features[0].dtype)
    d_features = [jax.core.ShapedArray(f.shape[:-4] + (factor * f.shape[-4],) + f.shape[-3:], acc) for f in features]
    return [jax.core.ShapedArray(rois.shape, rois.dtype), *d_features]


def _tangent_abstract(*args, cfg, grouped, tangents):
    _, _, rois, _, features = split_tangent_args(args)
    return _out_aval(rois, features, cfg)


forward_p.def_abstract_eval(_forward_abstract)
backward_p.def_abstract_eval(_backward_abstract)
tangent_p.def_abstract_eval(_tangent_abstract)


# ---------------------------------------------------------------------------------------
# The computation on one platform ("cpu", "cuda" or None: elsewhere), ungrouped
# ---------------------------------------------------------------------------------------

def _kernels(platform):
    """Whether ``platform`` runs the compiled kernels, and whether they are the CUDA ones
    (on CUDA, or emulated on CPU: their backward takes ``deterministic``)."""
    built = _loader.platforms()
    if platform == "cpu" and "cpu" in built:
        return True, _loader.cuda_emulated()
    if platform == "cuda" and "cuda" in built:
        return True, True
    return False, False


def _forward_call(platform, cfg, rois, level, *features):
    use, _ = _kernels(platform)
    if not use:
        return fallback.forward(cfg, rois, level, features)
    out = jax.ShapeDtypeStruct(_out_aval(rois, features, cfg).shape, features[0].dtype)
    return jax.ffi.ffi_call(FORWARD[cfg.kind], out)(*operands(cfg, rois, level, features),
                                                   **attributes(cfg, backward=False))


def _backward_call(platform, cfg, rois_grad, factor, cot, rois, level, *features):
    use, device = _kernels(platform)
    if not use:
        return fallback.backward(cfg, rois_grad, factor, cot, rois, level, features)
    avals = _backward_abstract(cot, rois, level, *features, cfg=cfg, grouped=False, rois_grad=rois_grad,
                               factor=factor)
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    attrs = attributes(cfg, backward=True, rois_grad=rois_grad, device_kernel=device)
    args = (cot, *operands(cfg, rois, level, features))
    if cfg.backward_returns_rois:
        return tuple(jax.ffi.ffi_call(BACKWARD[cfg.kind], structs)(*args, **attrs))
    d = jax.ffi.ffi_call(BACKWARD[cfg.kind], structs[1])(*args, **attrs)
    return (jnp.zeros_like(rois), d)


# ---------------------------------------------------------------------------------------
# Any form on one platform: grouped calls fold their groups into one partitioned call
# ---------------------------------------------------------------------------------------

def forward_impl(platform, rois, level, *features, cfg, grouped, partitioned=True):
    if not grouped:
        return _forward_call(platform, cfg, rois, level, *features)

    def per_shard(rois, level, *features):
        out = _forward_call(platform, cfg, fold_groups(rois, features[0].shape[1]), fold(level),
                            *(fold(f) for f in features))
        return unfold(out, rois.shape[0])

    return partition.image_partitioned(per_shard, rois, level, *features) if partitioned else per_shard(
        rois, level, *features)


def backward_impl(platform, cot, rois, level, *features, cfg, grouped, rois_grad, factor, partitioned=True):
    if not grouped:
        return tuple(_backward_call(platform, cfg, rois_grad, factor, cot, rois, level, *features))

    def per_shard(cot, rois, level, *features):
        groups = rois.shape[0]
        res = _backward_call(platform, cfg, rois_grad, factor, fold(cot),
                             fold_groups(rois, features[0].shape[1], factor), fold(level),
                             *(fold(f) for f in features))
        return (unfold(res[0], groups), *(ungroup_gradient(d, groups, factor) for d in res[1:]))

    args = (cot, rois, level, *features)
    return tuple(partition.image_partitioned(per_shard, *args) if partitioned else per_shard(*args))


def tangent_semantics(*args, cfg, grouped, tangents):
    """The tangent in terms of other primitives and pure JAX: the features' part through
    the forward kernel when the op is linear in the features (average RoIAlign and
    RoIWarp), the rest from the pure-JAX path's forward mode."""
    d_rois, d_features, rois, level, features = split_tangent_args(args)
    has_rois, has_features = tangents
    kernel_features = has_features and cfg.linear_in_features
    parts = []
    if kernel_features:
        parts.append(forward(rois, level, d_features, cfg=cfg, grouped=grouped))
    if (has_rois and cfg.has_box_gradient) or (has_features and not kernel_features):
        zero_features = tuple(jnp.zeros_like(d) for d in d_features)
        fd = zero_features if kernel_features else tuple(d_features)
        fr = d_rois if cfg.has_box_gradient else jnp.zeros_like(d_rois)

        def one(d_rois, d_features, rois, level, features):
            return fallback.tangent(cfg, d_rois, d_features, rois, level, features)

        fn = jax.vmap(one) if grouped else one
        parts.append(fn(fr, fd, rois, level, tuple(features)))
    if not parts:
        return jnp.zeros(_out_aval(rois, features, cfg).shape, features[0].dtype)
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


# ---------------------------------------------------------------------------------------
# Lowering
# ---------------------------------------------------------------------------------------

def _refuse_export(ctx, platform):
    if _kernels(platform)[0] and ctx.module_context.lowering_parameters.for_export:
        raise ValueError(
            'implementation: the kernel path (implementation="ffi", the default where the kernels '
            'are built) lowers to custom calls that jax.export cannot serialize; export functions '
            'built with implementation="xla" (pure JAX, every platform), got the kernel path')


def _several_devices(ctx):
    """Whether this computation may be partitioned: ``custom_partitioning`` cannot lower
    where the device assignment is not known (the compile of an eager call), and has
    nothing to do on one device."""
    context = ctx.module_context.axis_context
    if isinstance(context, ShardingContext):
        return context.device_assignment is not None and len(context.device_assignment) > 1
    return True


def _lowering(impl, platform, multiple_results):
    def rule(ctx, *args, **params):
        _refuse_export(ctx, platform)
        fn = functools.partial(impl, platform, partitioned=_several_devices(ctx), **params)
        return mlir.lower_fun(fn, multiple_results=multiple_results)(ctx, *args)
    return rule


for _platform in ("cpu", "cuda", None):
    _kw = {} if _platform is None else {"platform": _platform}
    mlir.register_lowering(forward_p, _lowering(forward_impl, _platform, False), **_kw)
    mlir.register_lowering(backward_p, _lowering(backward_impl, _platform, True), **_kw)
mlir.register_lowering(tangent_p, mlir.lower_fun(tangent_semantics, multiple_results=False))

# Outside jit, a primitive runs as its own compiled computation.
from jax._src import dispatch as _dispatch  # noqa: E402

for _p in (forward_p, backward_p, tangent_p):
    _p.def_impl(functools.partial(_dispatch.apply_primitive, _p))
    # The grouped form lowers through custom_partitioning, which needs the devices.
    _dispatch.prim_requires_devices_during_lowering.add(_p)
