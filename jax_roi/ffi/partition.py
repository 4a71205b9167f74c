"""Batch-sharded ``jit`` for the kernel path: each device computes its own images.

A custom call is opaque to XLA's partitioner, which would all-gather its operands. The
per-image form, though, is independent across images: a call whose operands and results
all lead with the image axis, and whose rois only read their own image, can run on each
shard's images alone. :func:`image_partitioned` says so with ``custom_partitioning``: the
image axis keeps its sharding, every other axis is replicated, and each shard runs the
same function on its local images.

It is used inside the kernel primitives' lowering (``primitives``), below every
transformation: ``custom_partitioning`` has no batching or differentiation rule, and
needs none there.
"""

from __future__ import annotations

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P


def _image_sharding(mesh, sharding, rank):
    axes = sharding.spec[0] if isinstance(sharding, NamedSharding) and len(sharding.spec) else None
    return NamedSharding(mesh, P(*((axes,) + (None,) * (rank - 1))))


def image_partitioned(fn, *args):
    """``fn(*args)``, where every array of ``args`` and of the result leads with the image
    axis and ``fn`` treats images independently, partitioned along that axis."""
    results = jax.eval_shape(fn, *args)
    leaves, treedef = jax.tree_util.tree_flatten(results)

    def dims(prefix, rank):
        return ["n"] + [f"{prefix}d{j}" for j in range(1, rank)]

    operands = [dims(f"a{i}", a.ndim) for i, a in enumerate(args)]
    outputs = [dims(f"r{i}", r.ndim) for i, r in enumerate(leaves)]
    others = tuple(f for spec in operands + outputs for f in spec[1:])
    rule = ", ".join(" ".join(s) for s in operands) + " -> " + ", ".join(" ".join(s) for s in outputs)

    def shardings_of(mesh, arg_shapes):
        first = arg_shapes[0].sharding
        arg_sh = tuple(_image_sharding(mesh, first, a.ndim) for a in args)
        out_sh = jax.tree_util.tree_unflatten(treedef, [_image_sharding(mesh, first, r.ndim) for r in leaves])
        return arg_sh, out_sh

    @custom_partitioning
    def call(*xs):
        return fn(*xs)

    def partition(mesh, arg_shapes, result_shape):
        arg_sh, out_sh = shardings_of(mesh, arg_shapes)
        return mesh, fn, out_sh, arg_sh

    def infer(mesh, arg_shapes, result_shape):
        return shardings_of(mesh, arg_shapes)[1]

    call.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                       need_replication_factors=others)

    return call(*args)
