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
