"""The command line: ``python -m jax_roi [demo|bench|info]`` (also installed as ``jax-roi``).

* ``demo`` (the default when no command is given): what is built, the worked examples computed
  by every built path, a timing on the box-head workload, and the sampling picture.
* ``bench``: the benchmark workloads (``docs/benchmarks.md``) on every available path, with
  torchvision as a peer when it is installed; a ratios table at the end.
* ``info``: which kernels are built, which devices jax sees, which path ``implementation=None``
  picks on each, and whether the CUDA emulation is on.

Every command has its own ``--help``.
"""

from __future__ import annotations

import argparse
import platform as _platform
import sys

COMMANDS = ("demo", "bench", "info")

_BACKENDS = ("cpu", "gpu", "tpu")


def _devices_by_platform() -> dict[str, list]:
    """``{platform: [devices]}`` for every backend jax can start here."""
    import jax

    found = {}
    for backend in _BACKENDS:
        try:
            devs = jax.devices(backend)
        except RuntimeError:  # no such backend on this machine
            continue
        if devs:
            found[backend] = devs
    return found


def default_paths() -> dict[str, str]:
    """``{platform: "ffi" | "xla"}``: the path ``implementation=None`` takes on each platform
    jax sees (the kernels where they are built for it, else pure JAX)."""
    from jax_roi import ffi

    built = set(ffi.platforms())
    return {p: ("ffi" if p in built else "xla") for p in _devices_by_platform()}


def info_dict() -> dict:
    import jax

    import jax_roi
    from jax_roi import ffi

    built = list(ffi.platforms())
    emulated = bool(getattr(ffi, "cuda_emulated", lambda: False)())
    devices = _devices_by_platform()
    return dict(jax_roi=jax_roi.__version__, jax=jax.__version__, python=_platform.python_version(),
                kernels=built, load_error=None if built else ffi.load_error(), cuda_emulated=emulated,
                devices={p: [f"{d} ({d.device_kind})" for d in ds] for p, ds in devices.items()},
                default_backend=jax.default_backend(), default_paths=default_paths())


def info() -> int:
    """Prints what is true of this install and machine."""
    d = info_dict()
    print(f"jax_roi {d['jax_roi']}  jax {d['jax']}  python {d['python']}")
    built = d["kernels"]
    if built:
        shown = [p for p in built if p != "gpu"]  # "gpu" is an alias of "cuda"
        print(f"kernels built (jax_roi.ffi.platforms()): {', '.join(shown)}")
    else:
        print(f"kernels built: none ({d['load_error']}); every op runs the pure-JAX path")
    print(f"CUDA emulation (JAX_ROI_EMULATE_CUDA): {'on' if d['cuda_emulated'] else 'off'}")
    print("devices jax sees:")
    for p, devs in d["devices"].items():
        more = f" (+{len(devs) - 1} more)" if len(devs) > 1 else ""
        print(f"  {p:<4} {len(devs)} device{'s' if len(devs) > 1 else ''}: {devs[0]}{more}")
    if "cuda" in built and "gpu" not in d["devices"]:
        print("  (the CUDA kernels are built, but jax sees no GPU: they are not used here)")
    print(f"implementation=None picks (default backend: {d['default_backend']}):")
    for p, path in d["default_paths"].items():
        why = ("the compiled kernels are built for it" if path == "ffi"
               else "pure JAX: no kernels built for this platform")
        print(f"  {p:<4} -> {path:<3}  ({why})")
    return 0


def build_info_parser(parser):
    parser.description = ("Which kernels are built, which devices jax sees, which path "
                          "implementation=None picks on each, and whether the CUDA emulation is on.")
    return parser


def build_demo_parser(parser):
    parser.description = ("The main job: what is built, the worked examples on every built path, "
                          "a timing on the box-head workload, and the sampling picture "
                          "(needs matplotlib; skipped with a message without it).")
    parser.add_argument("--picture", default="sampling_picture.png", help="where the PNG goes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: %(default)s)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing step")
    return parser


def _prog() -> str:
    """``jax-roi`` when run as the installed script, else ``python -m jax_roi``."""
    import os

    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "jax-roi" if name.startswith("jax-roi") else "python -m jax_roi"


def build_parser() -> argparse.ArgumentParser:
    from jax_roi.tools import bench

    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="jax_roi: region-of-interest ops for JAX. Without a command, runs the demo.",
        epilog="Run `python -m jax_roi COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,info}")
    build_demo_parser(sub.add_parser("demo", help="the main job (the default): worked examples, timing, picture"))
    bench.build_parser(sub.add_parser("bench", help="the benchmark workloads on every path, ratios at the end"))
    build_info_parser(sub.add_parser("info", help="what is built, which devices, which path each platform uses"))
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["demo"] + argv  # no command: the demo (its own options may follow)
    args = parser.parse_args(argv)
    if args.command == "bench":
        from jax_roi.tools import bench
        return bench.run_from_args(args)
    if args.command == "info":
        return info()
    from jax_roi.tools.demo import demo
    return demo(args.picture, timing=not args.no_timing, repeats=args.repeats)


if __name__ == "__main__":
    sys.exit(main())
