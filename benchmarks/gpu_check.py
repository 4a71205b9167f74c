"""The GPU check of jax_roi: one command, every stage under its own timeout.

    python benchmarks/gpu_check.py --out DIR          # on a machine with an NVIDIA GPU
    python benchmarks/gpu_check.py --cpu-dry-run --out DIR

Stages (each a child process of this script with a timeout; a failed stage does not stop
the later ones, except a failed build):

  1 preflight    the GPU (nvidia-smi), nvcc, compute-sanitizer, jax's devices
  2 build        the extension with the CUDA kernels for sm_90 only (CMake into a temporary
                 folder, no build isolation), copied with the package into DIR/pkg
  3 parity       in one process: the CUDA kernels against the CPU kernels (same process,
                 jax's CPU device) and the pure-JAX path on the GPU, forward and both
                 gradients: every op, both reductions, aligned / legacy / warp, both pool
                 binnings, multi-level, the position-sensitive ops, rotated RoIAlign, every
                 dtype, vector and
                 scalar channel counts, edge boxes, K = 0, vmap
  4 determinism  deterministic=True gradients bitwise equal over two runs and a fresh compile
  5 cmdbuf       one case under XLA command buffers (CUDA graphs) with custom calls captured
  6 sanitizer    compute-sanitizer memcheck and racecheck on one tiny case, limited to the
                 project's kernels
  7 timing       box-head, mask-head and gpu-large (roi_align) and an R-FCN head (ps_roi_align,
                 ps_roi_pool) against torchvision CUDA and the pure-JAX path on the GPU, a
                 rotated box head (roi_align_rotated) against the pure-JAX path:
                 forward, forward+backward (atomic and deterministic), median after warm-up,
                 compile time apart, achieved bandwidth against a device copy

--cpu-dry-run runs the same script on a machine without a GPU: the emulated CUDA kernels
(JAX_ROI_EMULATE_CUDA=1: the CUDA kernel code compiled for the host) stand in for the GPU in
stages 3 and 4, on smaller shapes; the build uses the in-place extension; the GPU-only
stages (5, 6, 7) are skipped with a message. Results: DIR/gpu_check.json and
DIR/gpu_check.log; a summary is printed last; the exit status is 1 if any stage failed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BUDGET_S = 8 * 60  # the whole check, machine start excluded
# Per-stage limits (seconds); each is also cut to what is left of the total budget.
LIMITS = {"preflight": 60, "build": 240, "parity": 210, "determinism": 60, "cmdbuf": 60, "sanitizer": 120,
          "timing": 150}
DRY_LIMITS = {"preflight": 60, "build": 30, "parity": 200, "determinism": 60}


# =======================================================================================
# Parent: runs the stages as children, collects their JSON, writes the report
# =======================================================================================

class Report:
    def __init__(self, out, dry_run):
        self.out, self.dry_run = out, dry_run
        self.start = time.monotonic()
        self.stages = []
        self.log = open(os.path.join(out, "gpu_check.log"), "w")

    def say(self, msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def left(self):
        return TOTAL_BUDGET_S - (time.monotonic() - self.start)

    def add(self, name, status, seconds, detail=None, result=None):
        row = {"stage": name, "status": status, "seconds": round(seconds, 1)}
        if detail:
            row["detail"] = detail
        if result is not None:
            row["result"] = result
        self.stages.append(row)
        self.say(f"--- {name}: {status} ({seconds:.0f} s){': ' + detail if detail else ''}")

    def write(self, extra):
        data = dict(extra, dry_run=self.dry_run, total_seconds=round(time.monotonic() - self.start, 1),
                    stages=self.stages, ok=all(s["status"] in ("ok", "skipped") for s in self.stages))
        with open(os.path.join(self.out, "gpu_check.json"), "w") as fh:
            json.dump(data, fh, indent=1)
        return data


def child_env(rep, pkg, extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg + os.pathsep + os.path.join(ROOT, "benchmarks")
    env["PYTHONUNBUFFERED"] = "1"
    # jax and torch share the GPU in one process (stage 7): no preallocation.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if rep.dry_run:
        env["JAX_ROI_EMULATE_CUDA"] = "1"
        env["JAX_PLATFORMS"] = "cpu"
    env.update(extra or {})
    return env


def run_child(rep, name, argv, env, limit, cwd):
    """Runs argv with a timeout; its output goes to the log. Returns (rc or None, seconds)."""
    limit = max(5.0, min(limit, rep.left()))
    rep.say(f"=== {name} (limit {limit:.0f} s): {' '.join(argv[-4:])}")
    t0 = time.monotonic()
    rep.log.write(f"$ {' '.join(argv)}\n")
    rep.log.flush()
    try:
        rc = subprocess.run(argv, env=env, cwd=cwd, stdout=rep.log, stderr=subprocess.STDOUT,
                            timeout=limit).returncode
    except subprocess.TimeoutExpired:
        rc = None
    return rc, time.monotonic() - t0


def stage_child(rep, name, pkg, limit, env_extra=None, wrap=()):
    """A stage implemented below (`--stage NAME`), in a child process."""
    result_path = os.path.join(rep.out, f"stage_{name}.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    argv = list(wrap) + [sys.executable, "-P", os.path.abspath(__file__), "--stage", name, "--out", rep.out]
    if rep.dry_run:
        argv.append("--cpu-dry-run")
    rc, secs = run_child(rep, name, argv, child_env(rep, pkg, env_extra), limit, cwd=rep.out)
    result = None
    if os.path.exists(result_path):
        with open(result_path) as fh:
            result = json.load(fh)
    if rc is None:
        rep.add(name, "timeout", secs, f"over {limit:.0f} s", result)
    elif rc != 0 or result is None or result.get("failures"):
        failures = (result or {}).get("failures") or [f"exit status {rc}"]
        rep.add(name, "failed", secs, "; ".join(map(str, failures[:8])), result)
    else:
        rep.add(name, "ok", secs, result.get("summary"), result)
    return result


def build(rep, pkg):
    """Stage 2: the extension for sm_90 only (or, in the dry run, the in-place one) into pkg."""
    t0 = time.monotonic()
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "jax_roi"), os.path.join(pkg, "jax_roi"),
                    ignore=shutil.ignore_patterns("_ext*.so", "__pycache__"))
    if rep.dry_run:
        built = glob.glob(os.path.join(ROOT, "jax_roi", "_ext*.so"))
        if not built:
            rep.add("build", "failed", time.monotonic() - t0,
                    "dry run: no in-place extension (jax_roi/_ext*.so); build it first (README)")
            return False
        shutil.copy2(built[0], os.path.join(pkg, "jax_roi"))
        rep.add("build", "skipped", time.monotonic() - t0,
                f"dry run: no sm_90 build; the in-place extension {os.path.basename(built[0])} is used")
        return True
    build_dir = tempfile.mkdtemp(prefix="jax_roi_build_")
    try:
        import pybind11  # noqa: F401  (the build needs it; fail early with its name)
        pybind11_dir = subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"], capture_output=True,
                                      text=True, check=True).stdout.strip()
    except Exception as e:  # noqa: BLE001
        rep.add("build", "failed", time.monotonic() - t0, f"pybind11 unavailable: {e}")
        return False
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", ROOT, "-B", build_dir, *generator, "-DCMAKE_BUILD_TYPE=Release", "-DJAX_ROI_CUDA=ON",
                 "-DJAX_ROI_CUDA_ARCHITECTURES=90-real", f"-DPython_EXECUTABLE={sys.executable}",
                 f"-Dpybind11_DIR={pybind11_dir}"]
    env = dict(os.environ)
    rc, _ = run_child(rep, "build: configure", configure, env, LIMITS["build"], cwd=ROOT)
    if rc == 0:
        rc, _ = run_child(rep, "build: compile", ["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 4)],
                          env, LIMITS["build"] - (time.monotonic() - t0), cwd=ROOT)
    secs = time.monotonic() - t0
    built = glob.glob(os.path.join(build_dir, "_ext*.so"))
    if rc != 0 or not built:
        rep.add("build", "timeout" if rc is None else "failed", secs, "see gpu_check.log")
        return False
    shutil.copy2(built[0], os.path.join(pkg, "jax_roi"))
    shutil.rmtree(build_dir, ignore_errors=True)
    rep.add("build", "ok", secs, "sm_90 (90-real), JAX_ROI_CUDA=ON, cmake without build isolation")
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.log and stage results")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="no GPU: emulated CUDA kernels in stages 3-4, GPU-only stages skipped")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.stage:
        return run_stage(args.stage, out, args.cpu_dry_run)

    rep = Report(out, args.cpu_dry_run)
    limits = DRY_LIMITS if rep.dry_run else LIMITS
    pkg = os.path.join(out, "pkg")
    rep.say(f"jax_roi GPU check{' (CPU dry run: emulated CUDA kernels)' if rep.dry_run else ''}, "
            f"python {sys.version.split()[0]}, out {out}")
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    # Stage 1 runs from the source tree's package (nothing is built yet).
    stage_child(rep, "preflight", ROOT, limits["preflight"])
    if not build(rep, pkg):
        rep.say("build failed: stopping")
    else:
        stage_child(rep, "parity", pkg, limits["parity"])
        stage_child(rep, "determinism", pkg, limits["determinism"])
        if rep.dry_run:
            for name, why in (("cmdbuf", "XLA command buffers need a GPU"),
                              ("sanitizer", "compute-sanitizer needs a GPU"),
                              ("timing", "timing the CUDA kernels needs a GPU")):
                rep.add(name, "skipped", 0.0, f"dry run: {why}")
        else:
            # Command buffers (CUDA graphs) for fusions and custom calls; the jax_roi handlers
            # are kCmdBufferCompatible, so XLA may capture them.
            stage_child(rep, "cmdbuf", pkg, limits["cmdbuf"], env_extra={
                "XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"})
            sanitizer(rep, pkg)
            stage_child(rep, "timing", pkg, limits["timing"])
    data = rep.write({"commit": commit, "python": sys.version.split()[0]})
    rep.say("=" * 72)
    rep.say(f"summary ({'CPU dry run' if rep.dry_run else 'GPU'}, {data['total_seconds']:.0f} s, commit {commit}):")
    for s in rep.stages:
        rep.say(f"  {s['stage']:<12} {s['status']:<8} {s['seconds']:>6.0f} s  {s.get('detail', '')}")
    rep.say(f"results: {os.path.join(out, 'gpu_check.json')}; log: {os.path.join(out, 'gpu_check.log')}")
    rep.say("ALL OK" if data["ok"] else "SOME STAGES FAILED")
    return 0 if data["ok"] else 1


def sanitizer(rep, pkg):
    """Stage 6: memcheck and racecheck on the tiny case, only the jax_roi kernels."""
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        rep.add("sanitizer", "failed", 0.0, "compute-sanitizer not on PATH")
        return
    t0 = time.monotonic()
    # The filter option has changed names across releases: try the current one first.
    filters = (["--kernel-name", "kns=jax_roi"], ["--filter", "kns=jax_roi"])
    env = child_env(rep, pkg, {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform",  # one cudaMalloc per buffer
                               "XLA_FLAGS": "--xla_gpu_autotune_level=0 --xla_gpu_enable_command_buffer="})
    results, failures = {}, []
    for check in ("memcheck", "racecheck"):
        extra = ["--leak-check", "no"] if check == "memcheck" else ["--racecheck-report", "hazard"]
        rc = None
        for flt in filters:
            argv = [tool, "--tool", check, "--error-exitcode", "86", "--print-limit", "20", *flt, *extra,
                    sys.executable, "-P", os.path.abspath(__file__), "--stage", "tiny", "--out", rep.out]
            rc, secs = run_child(rep, f"sanitizer: {check} {flt[0]}", argv, env, LIMITS["sanitizer"] / 2, rep.out)
            if rc not in (1, 255) or flt is filters[-1]:  # an unknown option exits 1 / 255 at once
                break
        results[check] = {"exit_status": rc, "filter": flt}
        if rc != 0:
            failures.append(f"{check}: {'timeout' if rc is None else ('errors found' if rc == 86 else f'exit {rc}')}")
    secs = time.monotonic() - t0
    if failures:
        rep.add("sanitizer", "failed", secs, "; ".join(failures) + " (see gpu_check.log)", results)
    else:
        rep.add("sanitizer", "ok", secs, "memcheck and racecheck: no errors in the jax_roi kernels", results)


# =======================================================================================
# Stages run in children (`--stage NAME`)
# =======================================================================================

def run_stage(name, out, dry_run):
    result = {"failures": []}
    try:
        fn = {"preflight": stage_preflight, "parity": stage_parity, "determinism": stage_determinism,
              "cmdbuf": stage_cmdbuf, "timing": stage_timing, "tiny": stage_tiny}[name]
        fn(result, dry_run)
    except Exception:  # noqa: BLE001  (reported as the stage's failure)
        traceback.print_exc()
        result["failures"].append("exception: " + traceback.format_exc(limit=3).strip().splitlines()[-1])
    if name != "tiny":
        with open(os.path.join(out, f"stage_{name}.json"), "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return 1 if result["failures"] else 0


def stage_preflight(result, dry_run):
    def run(cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (p.stdout + p.stderr).strip()
        except Exception as e:  # noqa: BLE001
            return f"unavailable: {e}"

    result["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    result["nvcc"] = run(["nvcc", "--version"]).splitlines()[-1:]
    result["compute_sanitizer"] = shutil.which("compute-sanitizer")
    import jax

    result["jax"] = jax.__version__
    result["devices"] = [str(d) for d in jax.devices()]
    result["backend"] = jax.default_backend()
    for mod in ("torch", "torchvision"):
        try:
            result[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            result[mod] = f"missing: {e}"
    if dry_run:
        result["summary"] = f"dry run: jax {jax.__version__} on {result['backend']} (GPU checks skipped)"
        return
    if result["backend"] != "gpu":
        result["failures"].append(f"jax runs on {result['backend']}, not on a GPU")
    if "unavailable" in result["nvidia_smi"]:
        result["failures"].append("nvidia-smi failed")
    if not result["nvcc"] or "unavailable" in result["nvcc"][0]:
        result["failures"].append("nvcc not found")
    result["summary"] = f"{result['nvidia_smi']}; jax {jax.__version__}; {result['devices'][:1]}"


# ---------------------------------------------------------------------------------------
# Cases for stages 3 and 4
# ---------------------------------------------------------------------------------------

def _edge_boxes(num_images, img_h, img_w):
    """Boxes in image pixels that exercise every special path of the kernels."""
    import numpy as np

    cx, cy = 0.4 * img_w, 0.5 * img_h
    return np.array([
        [0, cx, cy, cx, cy],                              # empty
        [0, cx + 3, cy + 2, cx - 2, cy - 3],              # inverted
        [num_images - 1, cx, cy, cx + 0.3, cy + 0.2],     # sub-pixel
        [-1, 1, 1, 5, 5],                                 # padding batch index
        [num_images, 1, 1, 5, 5],                         # past the last image
        [0, np.nan, 1, 5, 5], [0, 1, 1, np.inf, 5],       # non-finite
        [0, -1e30, -1e30, 1e30, 1e30],                    # absurd
        [0, -2 * img_w, -2 * img_h, -img_w, -img_h],      # off the map
        [0, -0.5 * img_w, -0.5 * img_h, 1.5 * img_w, 1.5 * img_h],  # covers the map
        [num_images - 1, 0, 0, img_w, img_h],             # exactly the map
    ])


def _boxes(rng, num_images, img_h, img_w, count, edge=True):
    import numpy as np

    x1 = rng.uniform(-0.1 * img_w, 0.9 * img_w, count)
    y1 = rng.uniform(-0.1 * img_h, 0.9 * img_h, count)
    bw = rng.uniform(1, 0.6 * img_w, count)
    bh = rng.uniform(1, 0.6 * img_h, count)
    b = rng.integers(0, num_images, count)
    rois = np.stack([b, x1, y1, x1 + bw, y1 + bh], axis=1)
    if edge:
        rois = np.concatenate([rois, _edge_boxes(num_images, img_h, img_w)])
    return rois


def _rotated(rng, rois):
    """Corner rois ``[K, 5]`` -> rotated rois ``[K, 6]`` ``(batch, x_ctr, y_ctr, w, h, angle)``
    with random angles: the same centres and sizes (the edge boxes stay empty, inverted,
    sub-pixel, dead, absurd, off or over the map)."""
    import numpy as np

    b, x1, y1, x2, y2 = rois.T
    angle = rng.uniform(-180, 180, rois.shape[0])
    return np.stack([b, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, angle], axis=1)


TOL = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def _cases(small):
    """The stage-3 cases: dicts of name, op, op kwargs, feature level shapes, dtype, channels,
    box count, output size and vmap. `small`: the dry run's subset (the emulation is slow)."""
    hw = (9, 13) if small else (24, 32)
    nb = 6 if small else 40
    vec = {"float64": 2, "float32": 4, "bfloat16": 8, "float16": 8}
    ops = {"align-avg-aligned-adaptive": ("roi_align", dict(sampling_ratio=-1, aligned=True)),
           "align-avg-legacy-sr2": ("roi_align", dict(sampling_ratio=2, aligned=False)),
           "align-max-aligned-sr2": ("roi_align", dict(sampling_ratio=2, aligned=True, reduction="max")),
           "align-max-legacy-adaptive": ("roi_align", dict(sampling_ratio=-1, aligned=False, reduction="max")),
           "warp-avg-sr2": ("roi_warp", dict(sampling_ratio=2)),
           "warp-max-adaptive": ("roi_warp", dict(sampling_ratio=-1, reduction="max")),
           "pool-caffe": ("roi_pool", dict(binning="caffe")),
           "pool-floor": ("roi_pool", dict(binning="floor")),
           # position-sensitive: `channels` is C_out (the maps have C_out * oh * ow)
           "ps-align-sr2": ("ps_roi_align", dict(sampling_ratio=2)),
           "ps-align-adaptive": ("ps_roi_align", dict(sampling_ratio=-1)),
           "ps-pool": ("ps_roi_pool", {}),
           "rotated-sr2": ("roi_align_rotated", dict(sampling_ratio=2)),
           "rotated-legacy-adaptive": ("roi_align_rotated", dict(sampling_ratio=-1, aligned=False))}
    if small:
        # (rotated RoIAlign's emulated kernels are compared in the determinism stage and in
        # tests/test_cuda_emulation.py: its pure-JAX gradients compile too slowly on 2 cores
        # for this stage's limit)
        plan = [("float32", [o for o in ops if not o.startswith("rotated")], ["vec"]), ("float32", ["align-avg-legacy-sr2", "pool-caffe"], ["scalar"]),
                ("float64", ["align-avg-aligned-adaptive", "ps-align-adaptive"], ["vec"]),
                ("bfloat16", ["align-avg-legacy-sr2"], ["vec", "scalar"]),
                ("float16", ["align-max-aligned-sr2"], ["vec"])]
    else:
        some = ["align-avg-aligned-adaptive", "align-max-legacy-adaptive", "warp-avg-sr2", "pool-caffe",
                "ps-align-sr2", "ps-pool", "rotated-sr2"]
        plan = [("float32", list(ops), ["vec", "scalar"]), ("float64", list(ops), ["vec"]),
                ("float64", ["align-avg-legacy-sr2"], ["scalar"]),
                ("bfloat16", some, ["vec"]), ("bfloat16", ["align-avg-legacy-sr2"], ["scalar"]),
                ("float16", some, ["vec"]), ("float16", ["align-max-aligned-sr2"], ["scalar"])]
    cases = []
    for dtype, names, widths in plan:
        for width in widths:
            c = 4 * vec[dtype] + (0 if width == "vec" else 1)  # a multiple of the vector width, or not
            for oname in names:
                op, kw = ops[oname]
                cases.append(dict(name=f"{oname}/{dtype}/C{c}-{width}", op=op, kw=kw, levels=[hw], dtype=dtype,
                                  channels=c, boxes=nb, output=(3, 4)))

    def extra(name, op, kw, **over):
        cases.append(dict(dict(name=name, op=op, kw=kw, levels=[hw], dtype="float32", channels=8, boxes=nb,
                               output=(2, 3)), **over))

    extra("align-avg/float32/C1", "roi_align", dict(sampling_ratio=2), channels=1)
    extra("align-avg/float32/HW1", "roi_align", dict(sampling_ratio=-1), levels=[(1, 1)])
    extra("align-avg/float32/K0", "roi_align", {}, boxes=0)
    half = ((hw[0] + 1) // 2, (hw[1] + 1) // 2)
    extra("multilevel/float32", "multiscale_roi_align", dict(sampling_ratio=2, aligned=False),
          levels=[(2 * hw[0], 2 * hw[1]), hw, half], channels=16, boxes=2 * nb)
    extra("vmap-boxes/roi_align/float32", "roi_align", {}, vmap="boxes")
    extra("vmap-features/roi_pool/float32", "roi_pool", {}, vmap="features")
    extra("vmap-boxes/ps_roi_align/float32", "ps_roi_align", dict(sampling_ratio=2), vmap="boxes", channels=3)
    if not small:
        extra("pool/float32/C1", "roi_pool", {}, channels=1)
        extra("pool/float32/HW1", "roi_pool", {}, levels=[(1, 1)])
        extra("pool/float32/K0", "roi_pool", {}, boxes=0)
        extra("multilevel/bfloat16", "multiscale_roi_align", dict(sampling_ratio=-1),
              levels=[(2 * hw[0], 2 * hw[1]), hw, half], dtype="bfloat16", channels=16, boxes=2 * nb)
        extra("vmap-features/roi_align/float32", "roi_align", dict(reduction="max"), vmap="features")
        extra("vmap-boxes/roi_pool/float32", "roi_pool", {}, vmap="boxes")
        extra("ps-align/float32/HW1", "ps_roi_align", dict(sampling_ratio=-1), levels=[(1, 1)], channels=3)
        extra("vmap-features/ps_roi_pool/float32", "ps_roi_pool", {}, vmap="features", channels=3)
        extra("vmap-boxes/roi_align_rotated/float32", "roi_align_rotated", dict(sampling_ratio=2), vmap="boxes")
        extra("rotated/float32/HW1", "roi_align_rotated", dict(sampling_ratio=-1), levels=[(1, 1)])
    return cases


def _make_case(case, seed):
    """(loss-and-grad function builder(impl, deterministic), numpy args, box-gradient wanted)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_roi

    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case["dtype"])
    coord = np.float64 if case["dtype"] == "float64" else np.float32
    b, c = 2, case["channels"]
    oh, ow = case["output"]
    multilevel = case["op"] == "multiscale_roi_align"
    # The position-sensitive ops' maps have a channel group of C_out = c per bin.
    map_channels = c * oh * ow if case["op"].startswith("ps_") else c
    scales = [0.5 / 2 ** l for l in range(len(case["levels"]))] if multilevel else [0.5]
    img_h, img_w = case["levels"][0][0] / scales[0], case["levels"][0][1] / scales[0]
    feats = [rng.standard_normal((b, h, w, map_channels)).astype(np.float32) for h, w in case["levels"]]
    rois = _boxes(rng, b, img_h, img_w, case["boxes"], edge=case["boxes"] > 0).astype(coord)
    if case["op"] == "roi_align_rotated":
        rois = _rotated(rng, rois).astype(coord)
    if case["boxes"] == 0:
        rois = np.zeros((0, rois.shape[1]), coord)
    box_grad = case["op"] in ("roi_align", "multiscale_roi_align", "ps_roi_align", "roi_align_rotated")
    vmap = case.get("vmap")
    n = 2 if vmap else None
    if vmap == "boxes":
        rois = np.stack([rois, rois[::-1].copy()])
    if vmap == "features":
        feats = [np.stack([f, -f]) for f in feats]
    cot_shape = ((n,) if n else ()) + (rois.shape[-2], oh, ow, c)
    cot = rng.standard_normal(cot_shape).astype(np.float32)

    def build(impl, deterministic):
        def op(fs, r):
            if multilevel:
                return jax_roi.multiscale_roi_align(list(fs), r, (oh, ow), spatial_scales=scales, implementation=impl,
                                                    deterministic=deterministic, **case["kw"])
            fn = getattr(jax_roi, case["op"])
            return fn(fs[0], r, (oh, ow), spatial_scale=scales[0], implementation=impl, deterministic=deterministic,
                      **case["kw"])

        if vmap == "boxes":
            op = jax.vmap(op, in_axes=(None, 0))
        elif vmap == "features":
            op = jax.vmap(op, in_axes=(0, None))

        def loss(fs, r, g):
            out = op(fs, r)
            return jnp.sum(out.astype(jnp.float32) * g), out

        argnums = (0, 1) if box_grad else (0,)

        def f(fs, r, g):
            fs = tuple(x.astype(dtype) for x in fs)
            grads, out = jax.grad(loss, argnums=argnums, has_aux=True)(fs, r, g)
            return out, grads
        return jax.jit(f)

    return build, (tuple(feats), rois, cot)


def _leaves(tree):
    import jax
    import numpy as np

    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def _max_rel_err(a, b):
    """Largest |a - b| over the arrays, relative to max(1, max |b|) of each."""
    import numpy as np

    worst = 0.0
    for x, y in zip(_leaves(a), _leaves(b)):
        if x.shape != y.shape:
            return float("inf")
        if x.size == 0:
            continue
        if not np.array_equal(np.isfinite(x), np.isfinite(y)):
            return float("inf")
        scale = max(1.0, float(np.nanmax(np.abs(np.where(np.isfinite(y), y, 0)))))
        worst = max(worst, float(np.nanmax(np.abs(np.where(np.isfinite(x), x - y, 0)))) / scale)
    return worst


def _devices(dry_run):
    """(device under test, its name, the CPU device for the CPU kernels or None)."""
    import jax

    if dry_run:
        return jax.devices("cpu")[0], "emulated CUDA kernels (cpu)", None
    return jax.devices("gpu")[0], "cuda", jax.devices("cpu")[0]


def _check_emulation(dry_run, result):
    from jax_roi import ffi

    if dry_run:
        if not ffi.cuda_emulated():
            raise RuntimeError(f"dry run: the emulated CUDA kernels are not registered ({ffi.load_error()})")
        result["kernels"] = "emulated CUDA kernels (JAX_ROI_EMULATE_CUDA=1) on the CPU"
    else:
        if "cuda" not in ffi.platforms():
            raise RuntimeError(f"the CUDA kernels are not built or registered: {ffi.load_error()}")
        result["kernels"] = "CUDA kernels (sm_90)"


def stage_parity(result, dry_run):
    import jax

    jax.config.update("jax_enable_x64", True)
    _check_emulation(dry_run, result)
    dev, dev_name, cpu = _devices(dry_run)
    result["device"] = dev_name
    result["references"] = ["pure-JAX path on the same device"] + (["CPU kernels (jax's CPU device)"] if cpu else [])
    if cpu is None:
        result["note"] = ("dry run: the emulated kernels replace the CPU kernels in this process, so they are "
                          "compared with the pure-JAX path only (tests/test_cuda_emulation.py compares them with "
                          "the CPU kernels call by call)")
    rows = []
    for i, case in enumerate(_cases(small=dry_run)):
        t0 = time.monotonic()
        build, args = _make_case(case, seed=i)
        tol = TOL[case["dtype"]]
        row = {"case": case["name"]}
        try:
            on_dev = jax.device_put(args, dev)
            got = build("ffi", False)(*on_dev)
            row["vs_xla"] = _max_rel_err(got, build("xla", False)(*on_dev))
            if cpu is not None:
                row["vs_cpu_kernels"] = _max_rel_err(got, build("ffi", False)(*jax.device_put(args, cpu)))
            row["deterministic_vs_atomic"] = _max_rel_err(build("ffi", True)(*on_dev), got)
            bad = [k for k in ("vs_xla", "vs_cpu_kernels", "deterministic_vs_atomic") if row.get(k, 0) > tol]
            row["ok"] = not bad
            if bad:
                result["failures"].append(f"{case['name']}: " + ", ".join(f"{k}={row[k]:.3g}" for k in bad))
        except Exception as e:  # noqa: BLE001
            row["ok"] = False
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            result["failures"].append(f"{case['name']}: {row['error'][:120]}")
        row["seconds"] = round(time.monotonic() - t0, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result["cases"] = rows
    result["summary"] = f"{sum(r['ok'] for r in rows)}/{len(rows)} cases within tolerance ({dev_name})"


def stage_determinism(result, dry_run):
    """deterministic=True: the gradients of two runs and of a fresh compile are bitwise equal."""
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    _check_emulation(dry_run, result)
    dev, dev_name, _ = _devices(dry_run)
    hw = (12, 17) if dry_run else (50, 68)
    c = 16 if dry_run else 256
    nb = 24 if dry_run else 1024
    cases = [dict(name="align-avg-sr2", op="roi_align", kw=dict(sampling_ratio=2), levels=[hw], dtype="float32",
                  channels=c, boxes=nb, output=(7, 7)),
             dict(name="align-max-adaptive", op="roi_align", kw=dict(reduction="max"), levels=[hw],
                  dtype="float32", channels=c, boxes=nb, output=(7, 7)),
             dict(name="pool-caffe", op="roi_pool", kw={}, levels=[hw], dtype="float32", channels=c, boxes=nb,
                  output=(7, 7)),
             dict(name="multilevel-bf16", op="multiscale_roi_align", kw=dict(sampling_ratio=2),
                  levels=[(2 * hw[0], 2 * hw[1]), hw], dtype="bfloat16", channels=c, boxes=nb, output=(7, 7)),
             # position-sensitive: C_out = c / 8 channels per bin, c * 49 / 8 in the maps
             dict(name="ps-align-sr2", op="ps_roi_align", kw=dict(sampling_ratio=2), levels=[hw], dtype="float32",
                  channels=c // 8, boxes=nb, output=(7, 7)),
             dict(name="ps-pool", op="ps_roi_pool", kw={}, levels=[hw], dtype="float32", channels=c // 8,
                  boxes=nb, output=(7, 7)),
             dict(name="rotated-sr2", op="roi_align_rotated", kw=dict(sampling_ratio=2), levels=[hw],
                  dtype="float32", channels=c, boxes=nb, output=(7, 7))]
    if dry_run:
        # the emulation is slow: one align, the pool, the multi-level, one position-sensitive
        # op, the rotated op
        cases = [cases[0], cases[2], cases[3], cases[4], cases[6]]
    rows = []
    for i, case in enumerate(cases):
        build, args = _make_case(case, seed=100 + i)
        on_dev = jax.device_put(args, dev)
        f = build("ffi", True)
        a, b = f(*on_dev), f(*on_dev)
        fresh = build("ffi", True)(*on_dev)  # a new jit: compiled again
        same = all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b))) and \
            all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(fresh)))
        g = build("ffi", False)
        atomic_same = all(np.array_equal(x, y) for x, y in zip(_leaves(g(*on_dev)), _leaves(g(*on_dev))))
        row = {"case": case["name"], "deterministic_bitwise_equal": same, "atomic_bitwise_equal_info": atomic_same}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if not same:
            result["failures"].append(f"{case['name']}: deterministic=True gradients differ between runs")
    result["cases"] = rows
    result["summary"] = f"{sum(r['deterministic_bitwise_equal'] for r in rows)}/{len(rows)} bitwise equal ({dev_name})"


def stage_cmdbuf(result, dry_run):
    import jax

    _check_emulation(dry_run, result)
    result["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    case = dict(name="align-avg", op="roi_align", kw=dict(sampling_ratio=2), levels=[(20, 24)], dtype="float32",
                channels=32, boxes=20, output=(7, 7))
    build, args = _make_case(case, seed=7)
    on_dev = jax.device_put(args, jax.devices()[0])
    f = build("ffi", True)
    text = f.lower(*on_dev).compile().as_text()
    result["command_buffer_in_hlo"] = "command_buffer" in text
    result["jax_roi_calls_in_hlo"] = text.count("jax_roi_roi_align")
    got = [f(*on_dev) for _ in range(3)]  # replays of the captured graph
    err = max(_max_rel_err(got[0], build("xla", False)(*on_dev)), _max_rel_err(got[0], got[2]))
    result["max_rel_err_vs_xla"] = err
    if err > TOL["float32"]:
        result["failures"].append(f"under command buffers: max relative error {err:.3g}")
    result["summary"] = (f"ok under {result['xla_flags']}; command_buffer in optimized HLO: "
                         f"{result['command_buffer_in_hlo']}")


def stage_tiny(result, dry_run):
    """The compute-sanitizer workload: every kernel once (both backward modes), tiny shapes,
    bad boxes included."""
    import jax

    for i, (op, kw) in enumerate((("roi_align", dict(sampling_ratio=2)), ("roi_align", dict(reduction="max")),
                                  ("roi_warp", dict(sampling_ratio=2)), ("roi_pool", {}),
                                  ("ps_roi_align", dict(sampling_ratio=2)), ("ps_roi_pool", {}),
                                  ("roi_align_rotated", dict(sampling_ratio=2)))):
        for dtype, c in (("float32", 8), ("float32", 3), ("bfloat16", 8)):
            case = dict(name=op, op=op, kw=kw, levels=[(5, 7)], dtype=dtype, channels=c, boxes=3, output=(2, 2))
            build, args = _make_case(case, seed=i)
            for det in (False, True):
                jax.block_until_ready(build("ffi", det)(*args))
    print("tiny case done", flush=True)


# ---------------------------------------------------------------------------------------
# Stage 7: timing
# ---------------------------------------------------------------------------------------

WORKLOADS = {  # (images, H, W, C, boxes per image, output, sampling ratio, scale)
    "box-head": (2, 50, 68, 256, 512, 7, 2, 1 / 16),
    "mask-head": (2, 50, 68, 256, 512, 14, 2, 1 / 16),
    "gpu-large": (8, 100, 136, 256, 512, 7, 2, 1 / 8),
}


def _median_ms(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _time_paths(row, op, x, r, g):
    """Adds to `row` the compile time and median of the forward and the forward+backward of
    op(x, r, impl, deterministic) on the kernels (atomic and deterministic backward) and the
    pure-JAX path: keys {path}_{fwd|fwd_bwd}_{ms|compile_s}."""
    import jax
    import jax.numpy as jnp

    for impl, det in (("ffi", False), ("ffi", True), ("xla", False)):
        tag = impl + ("-deterministic" if det else "")

        def fwd(x, r, impl=impl):
            return op(x, r, impl, False)

        def fwd_bwd(x, r, g, impl=impl, det=det):
            return jax.grad(lambda x: jnp.sum(op(x, r, impl, det) * g))(x)

        for kind, fn, args in (("fwd", jax.jit(fwd), (x, r)), ("fwd_bwd", jax.jit(fwd_bwd), (x, r, g))):
            if kind == "fwd" and det:
                continue  # the forward has no deterministic variant
            t0 = time.perf_counter()
            compiled = fn.lower(*args).compile()
            row[f"{tag}_{kind}_compile_s"] = round(time.perf_counter() - t0, 2)
            row[f"{tag}_{kind}_ms"] = round(_median_ms(lambda: jax.block_until_ready(compiled(*args))), 3)


# The R-FCN head of the position-sensitive ops: (images, H, W, C_out, boxes per image,
# output, sampling ratio, scale); the maps have C_out * output^2 channels (21 classes, 7 x 7).
PS_WORKLOAD = (2, 50, 68, 21, 300, 7, 2, 1 / 16)


def _time_position_sensitive(dev, has_tv):
    """One row per position-sensitive op on PS_WORKLOAD (and torchvision's, when there)."""
    import jax
    import numpy as np

    import jax_roi

    b, h, w, c_out, per, out, sr, scale = PS_WORKLOAD
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((b, h, w, c_out * out * out)).astype(np.float32)
    img_h, img_w = h / scale, w / scale
    rois = []
    for i in range(b):
        x1, y1 = rng.uniform(0, 0.8 * img_w, per), rng.uniform(0, 0.8 * img_h, per)
        bw, bh = rng.uniform(8, 8 + 0.4 * img_w, per), rng.uniform(8, 8 + 0.4 * img_h, per)
        rois.append(np.stack([np.full(per, i), x1, y1, x1 + bw, y1 + bh], axis=1))
    rois = np.concatenate(rois).astype(np.float32)
    cot = rng.standard_normal((rois.shape[0], out, out, c_out)).astype(np.float32)
    x, r, g = jax.device_put((feats, rois, cot), dev)
    ops = {"ps_roi_align": lambda x, r, impl, det: jax_roi.ps_roi_align(
               x, r, out, spatial_scale=scale, sampling_ratio=sr, implementation=impl, deterministic=det),
           "ps_roi_pool": lambda x, r, impl, det: jax_roi.ps_roi_pool(
               x, r, out, spatial_scale=scale, implementation=impl, deterministic=det)}
    rows = []
    for name, op in ops.items():
        row = {"workload": f"rfcn-head/{name}", "K": rois.shape[0]}
        _time_paths(row, op, x, r, g)
        if has_tv:
            import torch
            import torchvision

            tx = torch.from_numpy(np.ascontiguousarray(feats.transpose(0, 3, 1, 2))).cuda().requires_grad_(True)
            tr = torch.from_numpy(rois).cuda()
            tg = torch.from_numpy(np.ascontiguousarray(cot.transpose(0, 3, 1, 2))).cuda()
            kw = dict(spatial_scale=scale, sampling_ratio=sr) if name == "ps_roi_align" else dict(spatial_scale=scale)
            tv_op = getattr(torchvision.ops, name)

            def tv_fwd():
                with torch.no_grad():
                    tv_op(tx, tr, out, **kw)
                torch.cuda.synchronize()

            def tv_fwd_bwd():
                (grad,) = torch.autograd.grad(tv_op(tx, tr, out, **kw), tx, tg)
                torch.cuda.synchronize()
                return grad

            row["torchvision_fwd_ms"] = round(_median_ms(tv_fwd), 3)
            row["torchvision_fwd_bwd_ms"] = round(_median_ms(tv_fwd_bwd), 3)
            row["ffi_fwd_vs_torchvision"] = round(row["ffi_fwd_ms"] / row["torchvision_fwd_ms"], 3)
            del tx, tr, tg
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# A rotated box head: (images, H, W, C, boxes per image, output, sampling ratio, scale).
ROTATED_WORKLOAD = (2, 50, 68, 256, 512, 7, 2, 1 / 16)


def _time_rotated(dev):
    """One row: roi_align_rotated on ROTATED_WORKLOAD, random angles (no torchvision op)."""
    import jax
    import numpy as np

    import jax_roi

    b, h, w, c, per, out, sr, scale = ROTATED_WORKLOAD
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((b, h, w, c)).astype(np.float32)
    img_h, img_w = h / scale, w / scale
    rois = np.concatenate([np.stack([np.full(per, i), rng.uniform(0, img_w, per), rng.uniform(0, img_h, per),
                                     rng.uniform(8, 8 + 0.4 * img_w, per), rng.uniform(8, 8 + 0.4 * img_h, per),
                                     rng.uniform(-180, 180, per)], axis=1) for i in range(b)]).astype(np.float32)
    cot = rng.standard_normal((rois.shape[0], out, out, c)).astype(np.float32)
    x, r, g = jax.device_put((feats, rois, cot), dev)
    row = {"workload": "rotated-box-head/roi_align_rotated", "K": rois.shape[0]}
    _time_paths(row, lambda x, r, impl, det: jax_roi.roi_align_rotated(
        x, r, out, spatial_scale=scale, sampling_ratio=sr, implementation=impl, deterministic=det), x, r, g)
    print(json.dumps(row), flush=True)
    return [row]


def stage_timing(result, dry_run):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_roi

    _check_emulation(dry_run, result)
    dev = jax.devices()[0]
    # Device copy bandwidth: bytes read + written per second of a jitted elementwise op.
    nbytes = 1 << 30
    buf = jnp.ones((nbytes // 4,), jnp.float32)
    scale2 = jax.jit(lambda v: v * 2.0)
    copy_ms = _median_ms(lambda: scale2(buf).block_until_ready(), repeats=10)
    del buf
    copy_gbps = 2 * nbytes / (copy_ms * 1e-3) / 1e9
    result["device_copy_gbps"] = round(copy_gbps, 1)
    try:
        import torch
        import torchvision

        has_tv = torch.cuda.is_available()
    except Exception as e:  # noqa: BLE001
        has_tv, result["torchvision"] = False, f"unavailable: {e}"
    rows = []
    for name, (b, h, w, c, per, out, sr, scale) in WORKLOADS.items():
        rng = np.random.default_rng(0)
        feats = rng.standard_normal((b, h, w, c)).astype(np.float32)
        img_h, img_w = h / scale, w / scale
        rois = []
        for i in range(b):
            x1, y1 = rng.uniform(0, 0.8 * img_w, per), rng.uniform(0, 0.8 * img_h, per)
            bw, bh = rng.uniform(8, 8 + 0.4 * img_w, per), rng.uniform(8, 8 + 0.4 * img_h, per)
            rois.append(np.stack([np.full(per, i), x1, y1, x1 + bw, y1 + bh], axis=1))
        rois = np.concatenate(rois).astype(np.float32)
        k = rois.shape[0]
        cot = rng.standard_normal((k, out, out, c)).astype(np.float32)
        x, r, g = jax.device_put((feats, rois, cot), dev)
        moved = feats.nbytes + k * out * out * c * 4  # features read once + output written once
        row = {"workload": name, "K": k, "bytes_moved": moved}

        def roi_align(x, r, impl, det):
            return jax_roi.roi_align(x, r, out, spatial_scale=scale, sampling_ratio=sr, aligned=True,
                                     implementation=impl, deterministic=det)

        _time_paths(row, roi_align, x, r, g)
        row["ffi_fwd_gbps"] = round(moved / (row["ffi_fwd_ms"] * 1e-3) / 1e9, 1)
        row["ffi_fwd_fraction_of_copy"] = round(row["ffi_fwd_gbps"] / copy_gbps, 3)
        if has_tv:
            tx = torch.from_numpy(np.ascontiguousarray(feats.transpose(0, 3, 1, 2))).cuda()
            tr = torch.from_numpy(rois).cuda()
            tg = torch.from_numpy(np.ascontiguousarray(cot.transpose(0, 3, 1, 2))).cuda()

            def tv_fwd():
                torchvision.ops.roi_align(tx, tr, out, spatial_scale=scale, sampling_ratio=sr, aligned=True)
                torch.cuda.synchronize()

            txg = tx.clone().requires_grad_(True)

            def tv_fwd_bwd():
                y = torchvision.ops.roi_align(txg, tr, out, spatial_scale=scale, sampling_ratio=sr, aligned=True)
                (grad,) = torch.autograd.grad(y, txg, tg)
                torch.cuda.synchronize()
                return grad

            row["torchvision_fwd_ms"] = round(_median_ms(tv_fwd), 3)
            row["torchvision_fwd_bwd_ms"] = round(_median_ms(tv_fwd_bwd), 3)
            row["torchvision_fwd_gbps"] = round(moved / (row["torchvision_fwd_ms"] * 1e-3) / 1e9, 1)
            row["ffi_fwd_vs_torchvision"] = round(row["ffi_fwd_ms"] / row["torchvision_fwd_ms"], 3)
            row["ffi_fwd_bwd_vs_torchvision"] = round(row["ffi_fwd_bwd_ms"] / row["torchvision_fwd_bwd_ms"], 3)
            del tx, tr, tg, txg
            torch.cuda.empty_cache()
        row["deterministic_over_atomic_fwd_bwd"] = round(row["ffi-deterministic_fwd_bwd_ms"] / row["ffi_fwd_bwd_ms"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result["workloads"] = rows
    result["position_sensitive"] = _time_position_sensitive(dev, has_tv)
    result["rotated"] = _time_rotated(dev)
    parts = [f"{r['workload']}: ffi fwd {r['ffi_fwd_ms']} ms" +
             (f" ({r['ffi_fwd_fraction_of_copy']:.0%} of copy bw)" if "ffi_fwd_fraction_of_copy" in r else "") +
             (f", tv {r['torchvision_fwd_ms']} ms" if "torchvision_fwd_ms" in r else "")
             for r in rows + result["position_sensitive"] + result["rotated"]]
    result["summary"] = "; ".join(parts)

if __name__ == "__main__":
    sys.exit(main())
