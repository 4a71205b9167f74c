"""``python -m jax_roi bench``: the benchmark workloads (docs/benchmarks.md), every path, one run.

Each (workload, op, path) runs in a child process so that its peak resident memory is its own.
Times are medians of ``--repeats`` runs after warm-up, forward alone and forward + backward
(``jax.grad`` of a scalar of the output with respect to the features), each jit-compiled;
compile time is reported apart. Ratios are against peers measured in the same run: the
pure-JAX path, the kernels, and torchvision.ops when it is installed.

``ps_roi_align`` runs on the R-FCN workload (``rfcn``: 7 x 7 bins, 21 output channels, so
1029 input channels) against ``torchvision.ops.ps_roi_align``. ``roi_align_rotated`` runs on
the single-level box-head workloads with the same boxes turned by seeded random angles; its
torchvision peer is ``torchvision.ops.roi_align`` on those boxes at angle 0 (detectron2's
``ROIAlignRotated`` is not installable here; the axis-aligned op is the nearest peer).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

# name: (levels [(H, W)], spatial scales, images, boxes per image, output, sampling_ratio,
# image size; channels, CHANNELS unless given)
WORKLOADS = {
    "box-head": dict(levels=[(50, 68)], scales=[1 / 16], images=2, per_image=512, output=7,
                     sampling_ratio=2, image=(800, 1088)),
    "box-head-adaptive": dict(levels=[(50, 68)], scales=[1 / 16], images=2, per_image=512, output=7,
                              sampling_ratio=-1, image=(800, 1088)),
    "mask-head": dict(levels=[(50, 68)], scales=[1 / 16], images=2, per_image=512, output=14,
                      sampling_ratio=2, image=(800, 1088)),
    "fpn": dict(levels=[(200, 272), (100, 136), (50, 68), (25, 34)], scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32],
                images=2, per_image=512, output=7, sampling_ratio=2, image=(800, 1088)),
    "gpu-large": dict(levels=[(100, 136)], scales=[1 / 8], images=8, per_image=512, output=7,
                      sampling_ratio=2, image=(800, 1088)),
    # R-FCN's position-sensitive score maps: 21 classes x 7 x 7 bins, the box head's boxes.
    "rfcn": dict(levels=[(50, 68)], scales=[1 / 16], images=2, per_image=512, output=7,
                 sampling_ratio=2, image=(800, 1088), channels=21 * 7 * 7),
}
OPS = ("roi_align", "roi_pool", "multiscale_roi_align", "ps_roi_align", "roi_align_rotated")
CHANNELS = 256
PS_WORKLOADS = ("rfcn",)  # the only ones with C_out * 7 * 7 channels
ROTATED_SEED = 1  # the angles' generator, apart from the boxes' (the same boxes as roi_align's)
ROTATED_PEER_NOTE = ("roi_align_rotated vs torchvision: torchvision.ops.roi_align on the same boxes at angle 0 "
                     "(detectron2's ROIAlignRotated is not installable here; the axis-aligned op is the "
                     "nearest peer)")
# The pure-JAX path in each formulation of average RoIAlign (jax_roi/xla/formulation.py):
# `--formulation gather,matmul` measures both, as paths "xla" and "xla-matmul".
FORMULATION_PATHS = {"gather": "xla", "matmul": "xla-matmul"}
PATH_FORMULATION = {path: f for f, path in FORMULATION_PATHS.items()}
MATMUL_OPS = ("roi_align", "multiscale_roi_align")  # RoIPool has no matmul form


def channels(name: str) -> int:
    return WORKLOADS[name].get("channels", CHANNELS)


def make_inputs(name: str, seed: int = 0):
    """Features (NHWC float32, one array per level) and ``[K, 5]`` rois, as docs/benchmarks.md."""
    w = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    feats = [rng.standard_normal((w["images"], h, wd, channels(name)), dtype=np.float32) for h, wd in w["levels"]]
    img_h, img_w = w["image"]
    rois = []
    for b in range(w["images"]):
        n = w["per_image"]
        x1 = rng.uniform(0, 0.8 * img_w, n)
        y1 = rng.uniform(0, 0.8 * img_h, n)
        bw = rng.uniform(8, 8 + 0.4 * img_w, n)
        bh = rng.uniform(8, 8 + 0.4 * img_h, n)
        rois.append(np.stack([np.full(n, b), x1, y1, x1 + bw, y1 + bh], axis=1))
    return feats, np.concatenate(rois).astype(np.float32)


def rotated_rois(rois, seed: int = ROTATED_SEED):
    """``[K, 6]`` rotated rois ``(batch, x_ctr, y_ctr, w, h, angle)``: the corner rois'
    boxes about their centres, turned by angles uniform in [-180, 180) degrees."""
    b, x1, y1, x2, y2 = np.asarray(rois, np.float64).T
    angle = np.random.default_rng(seed).uniform(-180, 180, b.shape[0])
    return np.stack([b, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, angle], axis=1).astype(np.float32)


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` starts afresh at exec; ``ru_maxrss``
    would carry over the parent's peak from the fork."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure_jax(name, op, implementation, repeats):
    import jax
    import jax.numpy as jnp

    import jax_roi

    w = WORKLOADS[name]
    feats, rois = make_inputs(name)
    feats = [jnp.asarray(f) for f in feats]
    rois = jnp.asarray(rois)
    if implementation in PATH_FORMULATION:
        kw = dict(implementation="xla")
        if op in MATMUL_OPS:
            kw["formulation"] = PATH_FORMULATION[implementation]
    else:
        kw = dict(implementation=implementation)
    if op == "multiscale_roi_align":
        def f(fs, r):
            return jax_roi.multiscale_roi_align(fs, r, w["output"], spatial_scales=w["scales"],
                                                sampling_ratio=w["sampling_ratio"], **kw)
        args = (feats, rois)
    elif op == "roi_pool":
        def f(x, r):
            return jax_roi.roi_pool(x, r, w["output"], spatial_scale=w["scales"][0], **kw)
        args = (feats[0], rois)
    elif op == "ps_roi_align":
        def f(x, r):
            return jax_roi.ps_roi_align(x, r, w["output"], spatial_scale=w["scales"][0],
                                        sampling_ratio=w["sampling_ratio"], **kw)
        args = (feats[0], rois)
    elif op == "roi_align_rotated":
        def f(x, r):
            return jax_roi.roi_align_rotated(x, r, w["output"], spatial_scale=w["scales"][0],
                                             sampling_ratio=w["sampling_ratio"], **kw)
        args = (feats[0], jnp.asarray(rotated_rois(rois)))
    else:
        def f(x, r):
            return jax_roi.roi_align(x, r, w["output"], spatial_scale=w["scales"][0],
                                     sampling_ratio=w["sampling_ratio"], **kw)
        args = (feats[0], rois)

    fwd = jax.jit(f)
    bwd = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * 1.0)))
    result = {}
    for label, fn in (("fwd", fwd), ("fwd_bwd", bwd)):
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        result[f"{label}_compile_ms"] = (time.perf_counter() - t0) * 1e3
        result.update({f"{label}_{k}": v for k, v in _cost(compiled).items()})
        jax.block_until_ready(compiled(*args))  # warm-up
        result[f"{label}_ms"] = _median_ms(lambda: jax.block_until_ready(compiled(*args)), repeats)
    return result


def _cost(compiled):
    """XLA's cost analysis of the compiled function: ``flops`` and ``bytes`` accessed (a
    kernel custom call counts as nothing, so only the pure-JAX paths' figures mean much)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return {}
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    out = {}
    if cost and "flops" in cost:
        out["flops"] = float(cost["flops"])
    if cost and "bytes accessed" in cost:
        out["bytes"] = float(cost["bytes accessed"])
    return out


def _measure_torchvision(name, op, repeats):
    import torch
    import torchvision

    w = WORKLOADS[name]
    feats, rois = make_inputs(name)
    # On the GPU when torch sees one (the peer of the CUDA kernels), else on the CPU.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    feats = [torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2))).to(dev) for f in feats]
    rois_t = torch.from_numpy(rois).to(dev)
    if op == "multiscale_roi_align":
        names = [str(i) for i in range(len(feats))]
        pooler = torchvision.ops.MultiScaleRoIAlign(names, w["output"], w["sampling_ratio"])
        boxes = [rois_t[rois_t[:, 0] == b, 1:] for b in range(w["images"])]
        sizes = [tuple(w["image"])] * w["images"]

        def f(x):
            return pooler(dict(zip(names, x)), boxes, sizes)
    elif op == "roi_pool":
        def f(x):
            return torchvision.ops.roi_pool(x[0], rois_t, w["output"], w["scales"][0])
    elif op == "ps_roi_align":
        def f(x):
            return torchvision.ops.ps_roi_align(x[0], rois_t, w["output"], w["scales"][0], w["sampling_ratio"])
    else:  # roi_align; and roi_align_rotated's peer, roi_align on the same boxes at angle 0
        def f(x):
            return torchvision.ops.roi_align(x[0], rois_t, w["output"], w["scales"][0],
                                             w["sampling_ratio"], aligned=True)

    def fwd():
        f(feats)
        sync()

    def fwd_bwd():
        xs = [t.clone().requires_grad_(True) for t in feats]
        f(xs).sum().backward()
        sync()

    result = {"fwd_compile_ms": 0.0, "fwd_bwd_compile_ms": 0.0, "device": dev}
    with torch.no_grad():
        fwd()
        result["fwd_ms"] = _median_ms(fwd, repeats)
    fwd_bwd()
    result["fwd_bwd_ms"] = _median_ms(fwd_bwd, repeats)
    return result


def measure_one(name, op, path, repeats):
    if path == "torchvision":
        result = _measure_torchvision(name, op, repeats)
    else:
        result = _measure_jax(name, op, path, repeats)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


TORCHVISION_HINT = ("pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu "
                    "(CPU wheels; drop --index-url for CUDA ones)")


def torchvision_available() -> bool:
    # Found, not imported: the parent stays small (children measure their own memory).
    return importlib.util.find_spec("torchvision") is not None


def available_paths(formulations=("gather",)):
    import jax

    from jax_roi import ffi

    paths = [FORMULATION_PATHS[f] for f in formulations]
    if jax.default_backend() in ffi.platforms():
        paths.append("ffi")
    if torchvision_available():
        paths.append("torchvision")
    return paths


def _child(name, op, path, repeats, timeout):
    cmd = [sys.executable, "-m", "jax_roi.tools.bench", "--child", name, op, path, str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bytes_moved(name, op):
    """Bytes a forward must move: features read once, output written once."""
    w = WORKLOADS[name]
    c = channels(name)
    feats = sum(w["images"] * h * wd * c * 4 for h, wd in w["levels"])
    if op != "multiscale_roi_align":
        h, wd = w["levels"][0]
        feats = w["images"] * h * wd * c * 4
    out_channels = c // w["output"] ** 2 if op == "ps_roi_align" else c
    return feats + w["images"] * w["per_image"] * w["output"] ** 2 * out_channels * 4


def device_copy_gbps(repeats=10, nbytes=1 << 30):
    """Device-to-device copy bandwidth (bytes read + written per second, GB/s) of the
    default JAX device: a jitted elementwise op over ``nbytes`` of float32."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda v: v * 2.0)
    jax.block_until_ready(f(x))
    ms = _median_ms(lambda: jax.block_until_ready(f(x)), repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def runs_on(op, name) -> bool:
    """Whether ``op`` is measured on workload ``name``: the multi-level op on ``fpn`` alone
    (where roi_align is the single-level yardstick: finest level, same K), the
    position-sensitive op on the R-FCN maps alone, and the other ops on the rest (RoIPool and
    rotated RoIAlign single-level only)."""
    if name in PS_WORKLOADS:
        return op == "ps_roi_align"
    if op == "multiscale_roi_align":
        return name == "fpn"
    if op == "ps_roi_align":
        return False
    return not (op in ("roi_pool", "roi_align_rotated") and name == "fpn")


def run(workloads, ops, paths, repeats, json_path, timeout=900):
    import jax

    rows = []
    jobs = [(name, op, path) for name in workloads for op in ops if runs_on(op, name)
            for path in paths
            if not (path == FORMULATION_PATHS["matmul"] and op not in MATMUL_OPS)]
    if "torchvision" not in paths:
        print("torchvision is not installed: this run has no torchvision peer. To add it: "
              + TORCHVISION_HINT, flush=True)
    print(f"{len(jobs)} measurements, each in its own process (compile, warm-up, {repeats} timed runs "
          "forward and forward + backward):", flush=True)
    if "torchvision" in paths and any(op == "roi_align_rotated" for _, op, _ in jobs):
        print(ROTATED_PEER_NOTE, flush=True)
    for i, (name, op, path) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {name} {op} {path} ...", file=sys.stderr, flush=True)
        res = _child(name, op, path, repeats, timeout)
        res.update(workload=name, op=op, path=path)
        if op == "roi_align_rotated" and path == "torchvision":
            res["peer"] = "torchvision.ops.roi_align at angle 0"
        if "fwd_ms" in res:  # achieved forward bandwidth (bytes that must move)
            res["fwd_gbps"] = _bytes_moved(name, op) / (res["fwd_ms"] * 1e-3) / 1e9
        rows.append(res)
        print(_format_row(res), flush=True)
    _print_ratios(rows)
    info = dict(backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                cpu_count=os.cpu_count(), repeats=repeats, jax=jax.__version__, rows=rows)
    if jax.default_backend() == "gpu":  # the ceiling the achieved bandwidths compare with
        copy = device_copy_gbps()
        info["device_copy_gbps"] = copy
        print(f"device copy bandwidth: {copy:.0f} GB/s (read + write); forward bandwidth achieved:")
        for r in rows:
            if "fwd_gbps" in r:
                r["fwd_bw_fraction"] = r["fwd_gbps"] / copy
                print(f"  {r['workload']:<18} {r['op']:<21} {r['path']:<12} {r['fwd_gbps']:8.1f} GB/s "
                      f"({100 * r['fwd_bw_fraction']:.1f}% of copy)")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(info, fh, indent=1)
        print(f"wrote {json_path}")
    return info


def _format_row(r):
    head = f"{r['workload']:<18} {r['op']:<21} {r['path']:<12}"
    if "error" in r:
        return head + f" error: {r['error']}"
    line = head + (f" fwd {r['fwd_ms']:9.2f} ms  fwd+bwd {r['fwd_bwd_ms']:9.2f} ms  "
                   f"compile {r['fwd_compile_ms']:7.0f}/{r['fwd_bwd_compile_ms']:6.0f} ms  "
                   f"peak RSS {r['peak_rss_mb']:7.0f} MB")
    if r["path"] in PATH_FORMULATION and "fwd_flops" in r:  # XLA's cost analysis, pure JAX only
        line += (f"  GFLOP {r['fwd_flops'] / 1e9:.2f}/{r.get('fwd_bwd_flops', 0) / 1e9:.2f}"
                 f"  GB {r.get('fwd_bytes', 0) / 1e9:.2f}/{r.get('fwd_bwd_bytes', 0) / 1e9:.2f}")
    return line


def ratio_rows(rows):
    """``[(workload, op, path, peer, fwd ratio, fwd+bwd ratio)]``: peer time / path time,
    for every pair measured in the same run."""
    by = {(r["workload"], r["op"], r["path"]): r for r in rows if "error" not in r}
    out = []
    for (wl, op, path), r in sorted(by.items()):
        for peer in ("torchvision", "xla"):
            p = by.get((wl, op, peer))
            if p is None or peer == path:
                continue
            out.append((wl, op, path, peer, p["fwd_ms"] / r["fwd_ms"], p["fwd_bwd_ms"] / r["fwd_bwd_ms"]))
    return out


def _print_ratios(rows):
    by = {(r["workload"], r["op"], r["path"]): r for r in rows if "error" not in r}
    table = ratio_rows(rows)
    if table:
        print("\nspeed-up, peer time / path time (same run; > 1: the path is faster):")
        if any(op == "roi_align_rotated" and peer == "torchvision" for _, op, _, peer, _, _ in table):
            print("(" + ROTATED_PEER_NOTE + ")")
        print(f"{'workload':<18} {'op':<21} {'path':<12} {'vs':<12} {'fwd':>7}  {'fwd+bwd':>7}")
        for wl, op, path, peer, f, fb in table:
            print(f"{wl:<18} {op:<21} {path:<12} {peer:<12} {f:6.2f}x  {fb:6.2f}x")
    lines = []
    for (wl, op, path), r in sorted(by.items()):
        single = by.get((wl, "roi_align", path))
        if op == "multiscale_roi_align" and single is not None:
            lines.append(f"{wl:<18} {path:<12} fwd {r['fwd_ms'] / single['fwd_ms']:5.2f}x  "
                         f"fwd+bwd {r['fwd_bwd_ms'] / single['fwd_bwd_ms']:5.2f}x")
    if lines:
        print("\nmultiscale_roi_align time / single-level roi_align time (same K, finest level):")
        print("\n".join(lines))


def build_parser(parser=None):
    """The ``bench`` options, on ``parser`` (a subcommand's) or a new one."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="python -m jax_roi bench")
    parser.description = ("The benchmark workloads (docs/benchmarks.md) on every available path "
                          "(pure JAX, the kernels where built, torchvision when installed), each "
                          "measurement in its own process; rows as they finish, a ratios table at "
                          "the end, everything in a JSON file.")
    parser.add_argument("--workloads", default="box-head,box-head-adaptive,mask-head,fpn,rfcn",
                        help="comma list from: " + ", ".join(WORKLOADS) + " (default: %(default)s)")
    parser.add_argument("--ops", default=",".join(OPS),
                        help="comma list from: " + ", ".join(OPS) + " (default: %(default)s)")
    parser.add_argument("--paths", default=None,
                        help="comma list of xla, xla-matmul, ffi, torchvision (default: all available "
                             "here, the pure-JAX path in each --formulation)")
    parser.add_argument("--formulation", default="gather",
                        help="comma list of the pure-JAX path's formulations of average RoIAlign to "
                             "measure: gather (path xla), matmul (path xla-matmul) (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: %(default)s)")
    parser.add_argument("--json", default="bench_results.json", help="results file (default: %(default)s)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    return parser


def run_from_args(args) -> int:
    if args.child:
        name, op, path, repeats = args.child
        print(json.dumps(measure_one(name, op, path, int(repeats))))
        return 0

    def fail(msg):
        print(f"python -m jax_roi bench: error: {msg}", file=sys.stderr)
        return 2

    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            return fail(f"--workloads: expected names from {', '.join(WORKLOADS)}, got {w!r}")
    ops = [o for o in args.ops.split(",") if o]
    for o in ops:
        if o not in OPS:
            return fail(f"--ops: expected names from {', '.join(OPS)}, got {o!r}")
    formulations = [f for f in args.formulation.split(",") if f]
    for f in formulations:
        if f not in FORMULATION_PATHS:
            return fail(f"--formulation: expected names from {', '.join(FORMULATION_PATHS)}, got {f!r}")
    paths = args.paths.split(",") if args.paths else available_paths(formulations)
    for p in paths:
        if p not in ("xla", "xla-matmul", "ffi", "torchvision"):
            return fail(f"--paths: expected names from xla, xla-matmul, ffi, torchvision, got {p!r}")
    if "torchvision" in paths and not torchvision_available():
        return fail("--paths: torchvision is not installed. To add it: " + TORCHVISION_HINT)
    run(workloads, ops, paths, args.repeats, args.json)
    return 0


def main(argv=None):
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
