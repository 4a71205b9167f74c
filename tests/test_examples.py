"""Smoke tests of the example scripts (tiny sizes, a few steps) and of jax_roi.tools.figures."""

import importlib.util
import os
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Flax modules) look their module up there
    spec.loader.exec_module(module)
    return module


def _check_png(path, min_side=200):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= min_side
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not blank
    assert len(np.unique(rgb.reshape(-1, 3).round(2), axis=0)) > 20  # more than a few flat colours
    assert os.path.getsize(path) < 300_000


def test_detection_head(capsys):
    mod = _load("detection_head")
    res = mod.main(["--size", "64", "--train-images", "32", "--test-images", "8", "--steps", "40", "--batch", "8",
                    "--hidden", "32", "--no-progress"])
    losses = np.asarray(res["losses"])
    assert losses.shape == (40,) and np.all(np.isfinite(losses))
    assert res["last_loss"] < res["first_loss"]
    assert 0.0 <= res["accuracy"] <= 1.0 and np.isfinite(res["iou_after"])
    out = capsys.readouterr().out
    assert "held out" in out and "accuracy" in out


def test_detection_head_data():
    mod = _load("detection_head")
    rng = np.random.default_rng(0)
    images, gt_boxes, gt_classes = mod.make_images(rng, 4, 64)
    assert images.shape == (4, 64, 64, 3) and images.min() >= 0 and images.max() <= 1
    assert (gt_classes > 0).any(axis=1).all()
    boxes, labels, targets, matched = mod.make_proposals(rng, gt_boxes, gt_classes, 64, per_image=12)
    assert boxes.shape == (4, 12, 4) and labels.shape == (4, 12)
    assert (labels > 0).any() and (labels == 0).any()
    fg = labels > 0
    np.testing.assert_allclose(mod.decode(boxes, targets)[fg], matched[fg], atol=1e-3)  # deltas round-trip
    levels = mod.backbone(mod.backbone_params(mod.key(0)), images)
    assert [lv.shape[1] for lv in levels] == [16, 8, 4]


def test_alignment_study(tmp_path, capsys):
    mod = _load("alignment_study")
    out = tmp_path / "alignment.png"
    res = mod.main(["--size", "64", "--train", "48", "--test", "16", "--steps", "4", "--batch", "16",
                    "--strides", "16", "32", "--examples", "2", "--out", str(out)])
    assert set(res) == {(m, s) for m in mod.METHODS for s in (16, 32)}
    for r in res.values():
        assert 0.0 <= r["miou"] <= 1.0 and np.isfinite(r["first_loss"]) and np.isfinite(r["last_loss"])
    table = capsys.readouterr().out
    lines = table.splitlines()
    for method in mod.METHODS:  # every method has its row, with one number per stride
        row = [ln for ln in lines if ln.startswith(method + " ")]
        assert row, method
        assert len(row[0][len(method):].split()) == 2
    assert "stride 16" in table and "stride 32" in table
    _check_png(out)


def test_alignment_study_targets_follow_the_shape():
    """The mask target is the shape inside the box: a box around the shape's bounding box
    sees it fill its middle, a box shifted right sees it on its left."""
    mod = _load("alignment_study")
    rng = np.random.default_rng(1)
    shapes = mod.sample_shapes(rng, 6, 128)
    for i in range(6):
        box = mod.bounding_box(shapes, i)
        t = mod.mask_target(shapes, i, box)
        assert t[1:-1, 1:-1].any(axis=0).all() and t[1:-1, 1:-1].any(axis=1).all()  # touches every side
        assert t.mean() > 0.2
        w = box[2] - box[0]
        shifted = mod.mask_target(shapes, i, box + np.array([w / 2, 0, w / 2, 0]))
        assert shifted[:, :14].sum() > shifted[:, 14:].sum()
    img = mod.render(shapes, [0], 128, rng, noise=0.0)[0]
    x1, y1, x2, y2 = mod.bounding_box(shapes, 0)
    assert img.sum() > 0.5 * (x2 - x1) * (y2 - y1) * 0.2
    # nothing drawn outside its box (but the antialiased edge, within 2 pixels)
    inside = img[max(0, int(np.floor(y1)) - 2):int(np.ceil(y2)) + 2, max(0, int(np.floor(x1)) - 2):int(np.ceil(x2)) + 2]
    np.testing.assert_allclose(inside.sum(), img.sum(), rtol=1e-6)


def test_sampling_picture(tmp_path, capsys):
    mod = _load("sampling_picture")
    out = tmp_path / "sampling.png"
    assert mod.main(["--out", str(out)]) == 0
    _check_png(out)
    text = capsys.readouterr().out
    for method in ("roi_pool", "roi_warp", "roi_align", "roi_align_rotated"):
        assert method in text
    out2 = tmp_path / "legacy.png"
    assert mod.main(["--out", str(out2), "--box", "0.7", "2.2", "5.4", "4.9", "--output-size", "3",
                     "--legacy", "--binning", "floor", "--sampling-ratio", "0", "--highlight", "1", "1", "0", "0",
                     "--rotated-box", "4", "4", "6", "2.5", "-60"]) == 0
    _check_png(out2)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(aligned=False),
    dict(sampling_ratio=-1, output_size=(3, 2)),
    dict(binning="floor", output_size=3),
    dict(spatial_scale=0.5, map_size=(6, 9)),
], ids=["default", "legacy", "adaptive", "floor", "scale"])
def test_figure_geometry_matches_the_library(kw):
    """The drawn geometry (formulas from docs/semantics.md) is what the library computes, for boxes
    inside, crossing and leaving the map."""
    from jax_roi.tools import figures

    rng = np.random.default_rng(2)
    s = kw.get("spatial_scale", 1.0)
    H, W = kw.get("map_size", (8, 8))
    for _ in range(4):
        x1, y1 = rng.uniform(-2, W - 1) / s, rng.uniform(-2, H - 1) / s
        box = (x1, y1, x1 + rng.uniform(0.5, W) / s, y1 + rng.uniform(0.5, H) / s)
        for method in figures.METHODS:
            opts = {k: v for k, v in kw.items() if k != "output_size"}
            geo = figures.sampling_geometry(method, box, kw.get("output_size", 2), **opts)
            figures.check_geometry(geo)


@pytest.mark.parametrize("kw", [dict(), dict(aligned=False), dict(sampling_ratio=-1, output_size=(3, 2)),
                                dict(spatial_scale=0.5, map_size=(6, 9))], ids=["default", "legacy", "adaptive", "scale"])
def test_rotated_figure_geometry_matches_the_library(kw):
    """Rotated RoIAlign's drawn samples are where the op reads (ramp maps), for oriented boxes
    at any angle; the drawn box's corners and bins are its frame turned counter-clockwise
    (as drawn, y down) about its centre."""
    from jax_roi.tools import figures

    rng = np.random.default_rng(4)
    s = kw.get("spatial_scale", 1.0)
    H, W = kw.get("map_size", (8, 8))
    opts = {k: v for k, v in kw.items() if k != "output_size"}
    for _ in range(4):
        box = (rng.uniform(1, W - 1) / s, rng.uniform(1, H - 1) / s, rng.uniform(1, W) / s, rng.uniform(1, H) / s,
               rng.uniform(-180, 180))
        geo = figures.rotated_sampling_geometry(box, kw.get("output_size", 2), **opts)
        figures.check_geometry(geo)
        oh, ow = geo["output_size"]
        assert geo["bins"].shape == (oh, ow, 4, 2) and geo["samples"].shape == (oh, ow) + geo["grid"] + (2,)
        off = 0.5 if kw.get("aligned", True) else 0.0
        centre = np.array([box[0] * s - off, box[1] * s - off]) + 0.5
        np.testing.assert_allclose(geo["corners"].mean(0), centre, atol=1e-4)
        # the box's own x axis (first corner to second) points at the angle above the screen's x axis
        dx, dy = geo["corners"][1] - geo["corners"][0]
        t = np.deg2rad(box[4])
        np.testing.assert_allclose([dx, dy] / np.hypot(dx, dy), [np.cos(t), -np.sin(t)], atol=1e-4)


def test_figure_geometry_check_catches_a_wrong_picture():
    from jax_roi.tools import figures

    geo = figures.sampling_geometry("roi_align", (1.6, 1.3, 6.3, 5.9), 2)
    geo["samples"] = geo["samples"] + 0.5  # the legacy half-pixel error
    with pytest.raises(AssertionError):
        figures.check_geometry(geo)
    geo = figures.sampling_geometry("roi_pool", (1.6, 1.3, 6.3, 5.9), 2)
    geo["cells"] = geo["cells"] + 1
    with pytest.raises(AssertionError):
        figures.check_geometry(geo)
    geo = figures.rotated_sampling_geometry((4.0, 3.7, 5.2, 3.0, 30.0), 2)
    geo["samples"] = geo["samples"][:, :, ::-1, ::-1]  # the other turn's order (clockwise)
    with pytest.raises(AssertionError):
        figures.check_geometry(geo)


def test_bilinear_neighbours_weights():
    from jax_roi.tools import figures

    taps = figures.bilinear_neighbours(2.19, 1.89, (8, 8))  # picture coordinates
    assert len(taps) == 4
    np.testing.assert_allclose(sum(w for _, w in taps), 1.0)
    assert dict(taps)[(1, 1)] == pytest.approx((1 - 0.39) * (1 - 0.69))
    assert figures.bilinear_neighbours(-1.0, 3.0, (8, 8)) == []  # outside [-1, W] after the shift
    edge = figures.bilinear_neighbours(7.9, 7.9, (8, 8))  # past the last centre: clamped to one cell
    assert edge == [((7, 7), 1.0)]


def _readme_use_blocks():
    """The Python blocks of README.md's "Use" section, in order."""
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "README.md")
    with open(readme) as fh:
        text = fh.read()
    section = text[text.index("\n## Use\n"):]
    section = section[:section.index("\n## ", 1)]
    return [block.split("\n```", 1)[0] for block in section.split("```python\n")[1:]]


def test_readme_use_snippets_run(capsys):
    """The README's usage snippets (RoIAlign, the R-FCN ps_roi_align, the oriented boxes) run
    as written, in one namespace, and print the shapes their comments say."""
    import re

    blocks = _readme_use_blocks()
    assert len(blocks) == 3 and "ps_roi_align" in blocks[1] and "roi_align_rotated" in blocks[2]
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    printed = capsys.readouterr().out.split()
    said = re.findall(r"print\(.*\)\s+# (\([0-9, ]+\))", "\n".join(blocks))
    assert len(said) == 4
    assert " ".join(printed) == " ".join(said)
