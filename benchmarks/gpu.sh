#!/usr/bin/env bash
# The GPU run of jax_roi, in one script, for a machine with an NVIDIA GPU, nvcc, jax with its
# CUDA plugin, torch + torchvision, cmake, ninja, scikit-build-core and pybind11, and no network:
#
#   1. build        pip install --no-build-isolation --no-deps . with JAX_ROI_CUDA=ON
#   2. sanity       the CUDA targets are registered and jax runs on the GPU
#   3. tests        the whole pytest suite on the GPU (parity tests run every built implementation)
#   4. cmdbuf       the kernel tests again with XLA command buffers (CUDA graphs) capturing the
#                   custom calls, and a check that the optimized HLO put them in one
#   5. checks       deterministic=True gives bitwise-equal gradients twice (and after a fresh
#                   compile); CUDA kernels against the CPU kernels on the benchmark workloads and
#                   on edge boxes; atomic vs deterministic backward time
#   6. sanitizer    compute-sanitizer memcheck (and racecheck) over small forward + backward runs
#                   with out-of-range batch indices, NaN / inf / 1e30 boxes, both backward modes
#   7. bench        python -m jax_roi bench --workloads box-head,box-head-adaptive,mask-head,gpu-large
#                   -> benchmarks/results/<gpu-name>.json (torchvision CUDA peer, bandwidth)
#
# Usage: bash benchmarks/gpu.sh   (from anywhere; PYTHON=... to pick the interpreter)
# Logs go to ${OUT:-benchmarks/results}: gpu.log (the summary), one log per stage, the
# determinism report and the benchmark JSON. A failed stage is reported and the later stages
# still run (except after a failed build); the exit status is 1 if any stage failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT" benchmarks/results
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/gpu.log"
: > "$SUMMARY"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
FAILED=()

# No preallocation: pytest, the benchmark's parent and its children share the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_ROOT_USER_ACTION=ignore

say() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME LOGFILE CMD...: runs CMD with its output in LOGFILE (appended), records failure.
stage() {
  local name="$1" log="$2"
  shift 2
  say "=== [$(date +%H:%M:%S)] $name"
  echo "=== [$(date +%H:%M:%S)] $name: $*" >> "$log"
  local start=$SECONDS rc=0
  "$@" >> "$log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]]; then
    say "--- $name: ok ($((SECONDS - start)) s)"
  else
    say "--- $name: FAILED (exit $rc, $((SECONDS - start)) s); see $log"
    tail -n 25 "$log" | sed 's/^/    /' | tee -a "$SUMMARY"
    FAILED+=("$name")
  fi
  return 0
}

# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------
say "jax_roi GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)"
GPU_TAG="$(echo "${GPU_NAME:-gpu}" | sed 's/[^A-Za-z0-9._]\{1,\}/-/g; s/^-*//; s/-*$//')"
[[ -n "$GPU_TAG" ]] || GPU_TAG=gpu
say "GPU: ${GPU_NAME:-none found by nvidia-smi}; results tag: $GPU_TAG"
{
  nvidia-smi || true
  command -v nvcc && nvcc --version || echo "nvcc: not on PATH"
  command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
  "$PY" - <<'EOF' || true
import sys, importlib
print("python", sys.version.split()[0], sys.executable)
for m in ("jax", "jaxlib", "torch", "torchvision", "numpy", "scikit_build_core", "pybind11", "cmake", "ninja"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, "missing:", e)
EOF
} > "$OUT/build.log" 2>&1

# ---------------------------------------------------------------------------------------
# 1-2. Build, sanity (both required)
# ---------------------------------------------------------------------------------------
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
stage build "$OUT/build.log" env JAX_ROI_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -v .
if [[ " ${FAILED[*]} " == *" build "* ]]; then
  say "build failed: stopping"
  exit 1
fi
sanity() {
  # -P: not the source tree on sys.path, the installed package.
  (cd "$WORK" && "$PY" -P - <<'EOF'
import jax, jax.numpy as jnp, numpy as np
import jax_roi
from jax_roi import ffi
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
print("jax_roi from", jax_roi.__file__, "ffi platforms", ffi.platforms(), "error", ffi.load_error())
assert jax.default_backend() == "gpu", "jax does not run on the GPU"
assert "cuda" in ffi.platforms(), "the CUDA kernels are not built / registered"
x = jnp.arange(2 * 5 * 5 * 4, dtype=jnp.float32).reshape(2, 5, 5, 4) % 7
r = jnp.asarray([[0, 1, 1, 3, 3], [1, 0, 0, 4, 4], [-1, 0, 0, 1, 1]], jnp.float32)
out = jax_roi.roi_align(x, r, 2, sampling_ratio=2, implementation="ffi")
ref = jax_roi.roi_align(x, r, 2, sampling_ratio=2, implementation="xla")
text = jax.jit(lambda x, r: jax_roi.roi_align(x, r, 2, implementation="ffi")).lower(x, r).as_text()
assert "jax_roi_roi_align_fwd" in text, "the GPU lowering does not call the CUDA kernel"
np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
print("sanity ok")
EOF
  )
}
stage sanity "$OUT/build.log" sanity
if [[ " ${FAILED[*]} " == *" sanity "* ]]; then
  say "sanity failed: stopping"
  exit 1
fi

# ---------------------------------------------------------------------------------------
# 3. The whole test suite on the GPU
# ---------------------------------------------------------------------------------------
stage tests "$OUT/tests.log" "$PY" -P -m pytest -p no:cacheprovider -q -rfEs tests

# ---------------------------------------------------------------------------------------
# 4. Command buffers (CUDA graphs): the kernels' handlers are kCmdBufferCompatible
# ---------------------------------------------------------------------------------------
CMDBUF_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
cmdbuf_hlo() {
  rm -rf "$WORK/dump"
  (cd "$WORK" && XLA_FLAGS="$CMDBUF_FLAGS --xla_dump_to=$WORK/dump --xla_dump_hlo_as_text" "$PY" -P - <<'EOF'
import jax, jax.numpy as jnp, numpy as np
import jax_roi
x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 20, 24, 32)), jnp.float32)
r = jnp.asarray([[0, 1, 1, 30, 20], [1, 4, 2, 12, 30]], jnp.float32)
f = jax.jit(jax.grad(lambda x: jnp.sum(jax_roi.roi_align(x, r, 7, spatial_scale=0.5, implementation="ffi") ** 2)))
g = f(x)
jax.block_until_ready(g)
g2 = jax.jit(jax.grad(lambda x: jnp.sum(jax_roi.roi_align(x, r, 7, spatial_scale=0.5, implementation="xla") ** 2)))(x)
np.testing.assert_allclose(np.asarray(g), np.asarray(g2), rtol=1e-4, atol=1e-4)
print("command-buffer run ok")
EOF
  ) || return 1
  local hlo
  hlo="$(ls "$WORK"/dump/*after_optimizations.txt 2>/dev/null || true)"
  if [[ -z "$hlo" ]]; then echo "no HLO dump found"; return 1; fi
  # The custom calls inside a command-buffer computation of the optimized module.
  "$PY" - "$WORK/dump" <<'EOF'
import glob, re, sys
found = False
for path in glob.glob(sys.argv[1] + "/*after_optimizations.txt"):
    text = open(path).read()
    for comp in re.split(r"\n(?=\S)", text):
        head = comp.split("\n", 1)[0]
        if "command_buffer" in head and "jax_roi_roi_align" in comp:
            found = True
            print(path.rsplit("/", 1)[-1], ":", head[:120])
print("jax_roi custom calls captured in a command buffer:", found)
sys.exit(0 if found else 1)
EOF
}
stage cmdbuf-hlo "$OUT/tests.log" cmdbuf_hlo
stage cmdbuf-tests "$OUT/tests.log" env XLA_FLAGS="$CMDBUF_FLAGS" "$PY" -P -m pytest -p no:cacheprovider -q -rfEs \
  tests/test_roi_align.py tests/test_roi_pool.py tests/test_pyramid.py

# ---------------------------------------------------------------------------------------
# 5. Determinism, CUDA vs CPU kernels, atomic vs deterministic backward time
# ---------------------------------------------------------------------------------------
cat > "$WORK/checks.py" <<'EOF'
"""Determinism of deterministic=True (bitwise, twice and after a fresh compile), the CUDA
kernels against the CPU kernels (same process, jax's CPU device), and backward timings."""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from jax_roi.tools import bench  # noqa: E402
from jax_roi.ffi import ops as F  # noqa: E402
from jax_roi.pyramid import fpn_levels  # noqa: E402

sys.path.insert(0, sys.argv[2])  # tests/, for random_rois
from conftest import random_rois  # noqa: E402

GPU, CPU = jax.devices("gpu")[0], jax.devices("cpu")[0]
report, failures = {"cases": []}, []


def to(dev, tree):
    return jax.device_put(tree, dev)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def bitwise_equal(a, b):
    return all(x.tobytes() == y.tobytes() for x, y in zip(leaves(a), leaves(b)))


def close(a, b, atol, rtol):
    ok, worst = True, 0.0
    for x, y in zip(leaves(a), leaves(b)):
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        ok &= bool(np.allclose(x64, y64, atol=atol, rtol=rtol, equal_nan=True))
        if x64.size:
            worst = max(worst, float(np.nanmax(np.abs(x64 - y64))))
    return ok, worst


def median_ms(fn, args, repeats=20):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def run_case(name, make, args, atol, rtol, timing=False):
    """make(deterministic) -> f(*args) returning (output, gradients)."""
    row = {"case": name}
    gargs, cargs = to(GPU, args), to(CPU, args)
    f_det = jax.jit(make(True))
    a, b = f_det(*gargs), f_det(*gargs)
    c = jax.jit(make(True))(*gargs)  # a fresh compile
    row["deterministic_bitwise_repeat"] = bitwise_equal(a, b) and bitwise_equal(a, c)
    f_atomic = jax.jit(make(False))
    d, e = f_atomic(*gargs), f_atomic(*gargs)
    row["atomic_bitwise_repeat"] = bitwise_equal(d, e)  # information only
    row["atomic_vs_deterministic_ok"], row["atomic_vs_deterministic_max_abs"] = close(d, a, atol, rtol)
    ref = jax.jit(make(False))(*cargs)  # the CPU kernels
    row["cuda_vs_cpu_ok"], row["cuda_vs_cpu_max_abs"] = close(a, ref, atol, rtol)
    row["cuda_atomic_vs_cpu_ok"], _ = close(d, ref, atol, rtol)
    if timing:
        row["fwd_bwd_atomic_ms"] = median_ms(f_atomic, gargs)
        row["fwd_bwd_deterministic_ms"] = median_ms(f_det, gargs)
        row["deterministic_over_atomic"] = row["fwd_bwd_deterministic_ms"] / row["fwd_bwd_atomic_ms"]
    for key in ("deterministic_bitwise_repeat", "atomic_vs_deterministic_ok", "cuda_vs_cpu_ok",
                "cuda_atomic_vs_cpu_ok"):
        if not row[key]:
            failures.append(f"{name}: {key}")
    print(json.dumps(row), flush=True)
    report["cases"].append(row)


def align_case(output, sampling_ratio, scale, reduction="avg", quantize=False, dtype=jnp.float32,
               rois_grad=True):
    def make(det):
        def loss(x, r, cot):
            out = F.roi_align(x, r, output, spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=not quantize,
                              reduction=reduction, quantize=quantize, deterministic=det)
            return jnp.sum(out.astype(cot.dtype) * cot), out

        argnums = (0, 1) if rois_grad and not quantize else (0,)

        def f(x, r, cot):
            grads, out = jax.grad(loss, argnums=argnums, has_aux=True)(x, r, cot)
            return out, grads
        return f
    return make


def pool_case(output, scale, binning):
    def make(det):
        def loss(x, r, cot):
            out = F.roi_pool(x, r, output, spatial_scale=scale, binning=binning, deterministic=det)
            return jnp.sum(out.astype(cot.dtype) * cot), out

        def f(x, r, cot):
            grads, out = jax.grad(loss, has_aux=True)(x, r, cot)
            return out, grads
        return f
    return make


def workload(name, dtype=np.float32):
    feats, rois = bench.make_inputs(name)
    w = bench.WORKLOADS[name]
    k = rois.shape[0]
    cot = np.random.default_rng(1).standard_normal((k, w["output"], w["output"], bench.CHANNELS)).astype(np.float32)
    return [f.astype(dtype) for f in feats], rois, cot, w


# Benchmark workloads (float32), with timings.
for name in ("box-head", "box-head-adaptive", "mask-head", "gpu-large"):
    feats, rois, cot, w = workload(name)
    out = (w["output"], w["output"])
    run_case(f"{name}/align-avg", align_case(out, w["sampling_ratio"], w["scales"][0]), (feats[0], rois, cot),
             1e-4, 1e-4, timing=True)
feats, rois, cot, w = workload("box-head")
run_case("box-head/align-max", align_case((7, 7), 2, w["scales"][0], reduction="max"), (feats[0], rois, cot),
         1e-4, 1e-4, timing=True)
run_case("box-head/warp-avg", align_case((7, 7), 2, w["scales"][0], quantize=True), (feats[0], rois, cot),
         1e-4, 1e-4)
for binning in ("caffe", "floor"):
    run_case(f"box-head/pool-{binning}", pool_case((7, 7), w["scales"][0], binning), (feats[0], rois, cot),
             1e-5, 1e-5, timing=binning == "caffe")
# bf16 features (float32 accumulation; outputs rounded to bf16 once).
feats16, rois, cot, w = workload("box-head", jnp.bfloat16)
run_case("box-head/align-avg-bf16", align_case((7, 7), 2, w["scales"][0]), (feats16[0], rois, cot), 2e-2, 2e-2)

# FPN: the multi-level op in one call.
feats, rois, cot, w = workload("fpn")
level_ids = np.asarray(fpn_levels(rois[:, 1:], w["scales"]))


def fpn_make(det):
    def loss(levels, r, cot):
        out = F.multilevel_roi_align(levels, r, level_ids, (7, 7), spatial_scales=w["scales"], sampling_ratio=2,
                                     deterministic=det)
        return jnp.sum(out * cot), out

    def f(levels, r, cot):
        grads, out = jax.grad(loss, argnums=(0, 1), has_aux=True)(levels, r, cot)
        return out, grads
    return f


run_case("fpn/multilevel", fpn_make, (tuple(feats), rois, cot), 1e-4, 1e-4, timing=True)

# Edge boxes (dead, empty, inverted, NaN, inf, 1e30, off-map, covering), odd and even C,
# float32 and float64, both reductions, roi_pool both binnings.
rng = np.random.default_rng(7)
for dtype, tol in ((np.float64, 1e-9), (np.float32, 1e-4)):
    for channels in (3, 16):
        x = rng.standard_normal((2, 9, 13, channels)).astype(dtype)
        r = random_rois(rng, 2, 9, 13, 40, scale=0.5).astype(dtype)
        for sr, red in ((2, "avg"), (-1, "avg"), (-1, "max"), (3, "max")):
            cot = rng.standard_normal((r.shape[0], 3, 4, channels)).astype(dtype)
            run_case(f"edge/{np.dtype(dtype).name}/C{channels}/align-{red}-sr{sr}",
                     align_case((3, 4), sr, 0.5, reduction=red), (x, r, cot), tol, tol)
        cot = rng.standard_normal((r.shape[0], 3, 2, channels)).astype(dtype)
        for binning in ("caffe", "floor"):
            run_case(f"edge/{np.dtype(dtype).name}/C{channels}/pool-{binning}", pool_case((3, 2), 0.5, binning),
                     (x, r, cot), tol, tol)

report["failures"] = failures
with open(sys.argv[1], "w") as fh:
    json.dump(report, fh, indent=1)
print("failures:", failures or "none")
sys.exit(1 if failures else 0)
EOF
stage checks "$OUT/checks.log" bash -c "cd '$WORK' && '$PY' -P checks.py '$OUT/determinism.json' '$ROOT/tests'"

# ---------------------------------------------------------------------------------------
# 6. compute-sanitizer (memcheck, racecheck) over small runs with bad boxes
# ---------------------------------------------------------------------------------------
cat > "$WORK/sanitize.py" <<'EOF'
"""Small forward + backward runs of every CUDA kernel (both backward modes) on bad boxes.
argv[1] == "quick": float32 and the deterministic (shared-memory) kernels only."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
from jax_roi.ffi import ops as F  # noqa: E402

rng = np.random.default_rng(3)
B, H, W = 2, 7, 9
bad = np.array([
    [-1, 1, 1, 5, 5], [B, 1, 1, 5, 5], [B + 100, 1, 1, 5, 5], [-7, 1, 1, 5, 5], [1e9, 1, 1, 5, 5],
    [0, np.nan, 1, 5, 5], [0, 1, 1, np.inf, 5], [np.nan, 1, 1, 5, 5], [0, -np.inf, -np.inf, np.inf, np.inf],
    [0, -1e30, -1e30, 1e30, 1e30], [1, 1e30, 1e30, -1e30, -1e30], [1, -3e38, 0, 3e38, 3], [0, 3, 4, 3, 4],
    [1, 8, 6, 2, 1], [0, -50, -50, -20, -20], [1, -10, -10, 40, 40], [0, 1e7, 1e7, 1e7 + 3, 1e7 + 3],
    [1, 0.5, 0.5, 17.5, 13.5],
])
QUICK = len(sys.argv) > 1 and sys.argv[1] == "quick"
for dtype in (np.float32,) if QUICK else (np.float32, np.float64, jnp.bfloat16):
    for C in (3, 16):
        x = jnp.asarray(rng.standard_normal((B, H, W, C)), dtype)
        coord = np.float64 if dtype == np.float64 else np.float32
        r = jnp.asarray(bad, coord)
        for det in (True,) if QUICK else (False, True):
            for kw in (dict(sampling_ratio=2), dict(sampling_ratio=-1), dict(sampling_ratio=-1, reduction="max"),
                       dict(sampling_ratio=3, quantize=True), dict(sampling_ratio=5, aligned=False)):
                def loss(x, r):
                    out = F.roi_align(x, r, (3, 2), spatial_scale=0.5, deterministic=det, **kw)
                    return jnp.sum(out.astype(jnp.float32) ** 2)
                argnums = (0,) if kw.get("quantize") else (0, 1)
                out = jax.jit(lambda x, r: F.roi_align(x, r, (3, 2), spatial_scale=0.5, **kw))(x, r)
                g = jax.jit(jax.grad(loss, argnums=argnums))(x, r)
                jax.block_until_ready((out, g))
                assert np.all(np.asarray(out, np.float32)[:9] == 0), "dead rows must be zero"
                assert all(np.all(np.isfinite(np.asarray(v, np.float32))) for v in g), "gradients must be finite"
            for binning in ("caffe", "floor"):
                def ploss(x, r):
                    return jnp.sum(F.roi_pool(x, r, (2, 3), spatial_scale=0.5, binning=binning,
                                              deterministic=det).astype(jnp.float32) ** 2)
                g = jax.jit(jax.grad(ploss))(x, r)
                jax.block_until_ready(g)
            # multi-level, level ids out of range included
            levels = (x, x[:, ::2, ::2])
            lv = jnp.asarray(np.arange(len(bad)) % 4 - 1, jnp.int32)

            def mloss(levels, r):
                out = F.multilevel_roi_align(levels, r, lv, (2, 2), spatial_scales=[0.5, 0.25], sampling_ratio=-1,
                                             deterministic=det)
                return jnp.sum(out.astype(jnp.float32) ** 2)
            jax.block_until_ready(jax.jit(jax.grad(mloss, argnums=(0, 1)))(levels, r))
            # vmap over rois and over features (folded into one call each)
            rr = jnp.stack([r, r])
            jax.block_until_ready(jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(x, rr))
            jax.block_until_ready(jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None)))(jnp.stack([x, x]), r))
# K = 0 and C = 0
x = jnp.ones((B, H, W, 4), jnp.float32)
e = jnp.zeros((0, 5), jnp.float32)
for det in (False, True):
    jax.block_until_ready(jax.jit(jax.grad(lambda x: jnp.sum(F.roi_align(x, e, (2, 2), deterministic=det))))(x))
    jax.block_until_ready(jax.jit(jax.grad(lambda x: jnp.sum(F.roi_pool(x, e, (2, 2), deterministic=det))))(x))
    jax.block_until_ready(jax.jit(jax.grad(lambda x: jnp.sum(F.roi_align(x[..., :0], r, (2, 2), deterministic=det))))(x))
print("sanitizer workload done")
EOF
sanitize() {
  local tool="$1" mode="$2"
  shift 2
  if ! command -v compute-sanitizer > /dev/null; then
    echo "compute-sanitizer not found"
    return 1
  fi
  # One cudaMalloc per buffer (out-of-bounds accesses inside a pool would go unseen), no
  # autotuning (it runs many unrelated kernels), no command buffers.
  (cd "$WORK" && XLA_PYTHON_CLIENT_ALLOCATOR=platform \
    XLA_FLAGS="--xla_gpu_autotune_level=0 --xla_gpu_enable_command_buffer=" \
    compute-sanitizer --tool "$tool" --error-exitcode 86 --print-limit 50 "$@" "$PY" -P sanitize.py "$mode")
}
stage memcheck "$OUT/sanitizer.log" sanitize memcheck full --leak-check no
stage racecheck "$OUT/sanitizer.log" sanitize racecheck quick --racecheck-report hazard

# ---------------------------------------------------------------------------------------
# 7. Benchmarks
# ---------------------------------------------------------------------------------------
BENCH_JSON="benchmarks/results/${GPU_TAG}.json"
stage bench "$OUT/bench.log" bash -c "cd '$WORK' && '$PY' -P -m jax_roi bench \
  --workloads box-head,box-head-adaptive,mask-head,gpu-large --json '$ROOT/$BENCH_JSON'"
if [[ -f "$BENCH_JSON" && "$OUT" != "$ROOT/benchmarks/results" ]]; then
  cp "$BENCH_JSON" "$OUT/"
fi

# ---------------------------------------------------------------------------------------
say "=== done: ${#FAILED[@]} stage(s) failed${FAILED[*]:+: ${FAILED[*]}}"
[[ ${#FAILED[@]} -eq 0 ]]
