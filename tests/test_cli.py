"""The command line (python -m jax_roi, jax-roi): every subcommand listed and with its own
--help, info tells what is true here, the demo works without matplotlib, the core package
never imports the tools or their optional dependencies."""

import json
import subprocess
import sys

import pytest

from jax_roi.tools import cli


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jax_roi", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_help_lists_every_command():
    proc = _run("--help")
    assert proc.returncode == 0
    for command in ("demo", "bench", "info"):
        assert command in proc.stdout


@pytest.mark.parametrize("command, words", [
    ("demo", ["--picture", "--no-timing"]),
    ("bench", ["--workloads", "--paths", "--repeats"]),
    ("info", ["implementation=None"]),
])
def test_each_command_has_its_own_help(command, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m jax_roi {command}")
    for w in words:
        assert w in out
    assert "kernels built" not in out  # `info --help` prints help, it does not run info


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["frobnicate"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_info_tells_what_is_true(capsys):
    import jax

    from jax_roi import ffi

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    d = cli.info_dict()
    assert set(d["kernels"]) == set(ffi.platforms())
    assert set(d["devices"]) >= {"cpu"}
    assert "gpu" in d["devices"] or not any(dv.platform == "gpu" for dv in jax.devices())
    for platform_, path in d["default_paths"].items():
        assert path == ("ffi" if platform_ in ffi.platforms() else "xla")
        assert f"{platform_:<4} -> {path}" in out
    assert d["cuda_emulated"] == bool(getattr(ffi, "cuda_emulated", lambda: False)())
    assert "CUDA emulation" in out
    json.dumps(d)


def test_default_path_is_what_the_ops_use():
    """``info``'s claim for the default backend is the path ``implementation=None`` runs."""
    import jax
    import jax.numpy as jnp

    import jax_roi

    backend = jax.default_backend()
    claimed = cli.default_paths()[backend]
    x = jnp.ones((1, 4, 4, 1), jnp.float32)
    r = jnp.asarray([[0, 0, 0, 3, 3]], jnp.float32)
    text = jax.jit(lambda x, r: jax_roi.roi_align(x, r, 2)).lower(x, r).as_text()
    assert ("custom_call" in text) == (claimed == "ffi")


def test_demo_without_matplotlib(tmp_path, monkeypatch, capsys):
    """A plain `pip install .` has no matplotlib: the demo prints its results, says the
    picture was skipped and how to get it, and exits 0."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    picture = tmp_path / "p.png"
    assert cli.main(["demo", "--no-timing", "--picture", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "expected" in out and "sampling picture skipped" in out and "pip install" in out
    assert not picture.exists()


def test_demo_draws_the_picture(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "p.png"
    assert cli.main(["--no-timing", "--picture", str(picture)]) == 0  # no command: the demo
    assert picture.stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out


def test_bench_without_torchvision_says_how_to_add_it(tmp_path, monkeypatch, capsys):
    from jax_roi.tools import bench

    monkeypatch.setattr(bench, "torchvision_available", lambda: False)
    # one cheap measurement, in-process instead of a child process
    monkeypatch.setattr(bench, "_child", lambda name, op, path, repeats, timeout: dict(
        fwd_ms=2.0 if path == "xla" else 1.0, fwd_bwd_ms=4.0 if path == "xla" else 1.0, fwd_compile_ms=0.0,
        fwd_bwd_compile_ms=0.0, peak_rss_mb=1.0))
    out_json = tmp_path / "b.json"
    assert cli.main(["bench", "--workloads", "box-head", "--ops", "roi_align", "--paths", "xla,ffi",
                     "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "torchvision is not installed" in out and "pip install torch torchvision" in out
    tail = out[out.index("speed-up"):]
    assert "ffi" in tail and "2.00x" in tail and "4.00x" in tail
    assert json.loads(out_json.read_text())["rows"]
    assert cli.main(["bench", "--paths", "torchvision"]) == 2


def test_core_imports_no_tools_and_no_optional_packages():
    """(optax may come in: flax.nnx imports it.)"""
    code = ("import sys, jax_roi, jax_roi.linen, jax_roi.nnx, jax_roi.ffi; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('matplotlib', 'tqdm', 'torch', 'torchvision', 'pytest', 'hypothesis')"
            " or m.startswith('jax_roi.tools')]; print(bad); assert not bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bench_rows_for_the_position_sensitive_and_rotated_ops(tmp_path, monkeypatch, capsys):
    """ps_roi_align runs on the R-FCN maps only (1029 channels, K = 1024), roi_align_rotated on
    the single-level box-head workloads; the rotated op's torchvision peer (roi_align at
    angle 0) is named in the output and in its JSON row."""
    import numpy as np

    from jax_roi.tools import bench

    feats, rois = bench.make_inputs("rfcn")
    assert feats[0].shape == (2, 50, 68, 21 * 7 * 7) and rois.shape == (1024, 5)
    rotated = bench.rotated_rois(rois)
    np.testing.assert_allclose(rotated[:, 1:5], np.stack([(rois[:, 1] + rois[:, 3]) / 2, (rois[:, 2] + rois[:, 4]) / 2,
                                                          rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]], 1),
                               rtol=1e-6)
    assert rotated[:, 5].min() >= -180 and rotated[:, 5].max() < 180 and rotated[:, 5].std() > 90
    np.testing.assert_array_equal(bench.rotated_rois(rois), rotated)  # seeded
    monkeypatch.setattr(bench, "torchvision_available", lambda: True)
    calls = []

    def child(name, op, path, repeats, timeout):
        calls.append((name, op, path))
        return dict(fwd_ms=3.0 if path == "xla" else 1.0, fwd_bwd_ms=6.0 if path == "xla" else 2.0,
                    fwd_compile_ms=0.0, fwd_bwd_compile_ms=0.0, peak_rss_mb=1.0)

    monkeypatch.setattr(bench, "_child", child)
    out_json = tmp_path / "b.json"
    assert cli.main(["bench", "--workloads", "box-head,fpn,rfcn", "--ops", "roi_align,ps_roi_align,roi_align_rotated",
                     "--paths", "xla,torchvision", "--json", str(out_json)]) == 0
    assert sorted(calls) == sorted([(w, o, p) for w, o in [("box-head", "roi_align"), ("box-head", "roi_align_rotated"),
                                                           ("fpn", "roi_align"), ("rfcn", "ps_roi_align")]
                                    for p in ("xla", "torchvision")])
    out = capsys.readouterr().out
    assert out.count("torchvision.ops.roi_align on the same boxes at angle 0") == 2  # before the rows, in the ratios
    ratios = out[out.index("speed-up"):]
    assert "rfcn               ps_roi_align          xla          torchvision    0.33x" in ratios
    rows = json.loads(out_json.read_text())["rows"]
    peers = {(r["workload"], r["op"], r["path"]): r.get("peer") for r in rows}
    assert peers[("box-head", "roi_align_rotated", "torchvision")] == "torchvision.ops.roi_align at angle 0"
    assert peers[("box-head", "roi_align", "torchvision")] is None
