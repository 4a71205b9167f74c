"""Write tests/golden/torchvision_golden.npz from torchvision (run with a venv that has it):

    python tests/golden/make_golden.py      # in an environment with torch and torchvision

Everything is seeded, float32 on CPU.  Every array that has a layout is stored twice: raw
torchvision layout (suffix ``_nchw``: features [B,C,H,W], outputs/cotangents [K,C,oh,ow])
and converted (suffix ``_nhwc``: features [B,H,W,C], outputs/cotangents [K,oh,ow,C]).

Key naming
----------
Metadata (0-d unicode arrays): ``torch_version``, ``torchvision_version``, ``numpy_version``.

roi_align families ``F`` in ``align`` (B=2, C=3, H=13, W=17), ``alignsmall`` (B=1,
C=2, H=3, W=4: output sizes larger than the map, where a cap on an explicit sampling_ratio
would show) and ``alignlarge`` (B=2, C=3, H=11, W=14: boxes 2x to 4x the map, some crossing
its edges, adaptive mode only: the per-bin sample count ceil(bin) is far above
ceil(size / bins), and at 1x1 output above the 2*size + 6 sample window of the kernels):
  ``F_features_{nchw,nhwc}``  float32 features
  ``F_rois``                  [K,5] float32 (batch_index, x1, y1, x2, y2), image pixels
  ``F_box_kind``              [K] str, what each box is meant to exercise
  ``F_tags``                  [n] str, one tag per setting
  ``F_params``                [n,5] float64: spatial_scale, sampling_ratio, aligned, oh, ow
  per tag T (e.g. ``align_s0p5_srm1_al1_o2x4``: scale 0.5, sampling_ratio -1, aligned=True,
  output (2,4)):
  ``T_out_{nchw,nhwc}``       torchvision.ops.roi_align output
  ``T_cot_{nchw,nhwc}``       the random cotangent used for the backward pass
  ``T_dfeat_{nchw,nhwc}``     d(sum(out * cot))/d(features)
  ``T_tvfail``               [K] bool: boxes torchvision's CPU kernel raises on ("cannot
                              create std::vector larger than max_size()": one axis inverted
                              in adaptive mode makes gy*gx negative); their output rows are
                              NaN and their cotangent rows 0 (so dfeat excludes them).
  (torchvision gives no box gradient; none is stored.)

roi_pool family ``pool`` (features ``align_features_*``):
  ``pool_rois``, ``pool_box_kind``, ``pool_tags``,
  ``pool_params`` [n,3] float64: spatial_scale, oh, ow
  per tag (e.g. ``pool_s1_o3x3``): ``T_out_*``, ``T_cot_*``, ``T_dfeat_*`` as above.
``poolex_map`` [8,8] (the docs' example map), ``poolex_rois`` [1,5] = (0, 0,3,6,7),
``poolex_out`` [2,2]: torchvision.ops.roi_pool on it, 2x2 output.

MultiScaleRoIAlign family ``msra`` (image 128x160 (H, W), B=2, C=3, 4 levels of scales
1/4, 1/8, 1/16, 1/32, featmap names p2..p5, aligned=False as torchvision):
  ``msra_level{i}_{nchw,nhwc}``  i = 0..3
  ``msra_scales``                [4] float64, the scales torchvision inferred
  ``msra_image_size``            [2] int64 (H, W)
  ``msra_boxes_img0``, ``msra_boxes_img1``  [Ni,4] float32, the per-image box list passed in
  ``msra_rois``                  [K,5] float32, torchvision's _convert_to_roi_format of them
  ``msra_levels``                [K] int64, absolute FPN level torchvision's mapper assigns
  ``msra_tags``, ``msra_params`` [n,3] float64: sampling_ratio, oh, ow
  per tag (e.g. ``msra_sr0_o7x7``): ``T_out_{nchw,nhwc}``
``msraneg_*``: the same levels and one image with boxes of negative area (exactly one axis
inverted): ``msraneg_boxes_img0``, ``msraneg_rois``, ``msraneg_out_{nchw,nhwc}`` (2x2,
sampling_ratio 2).  torchvision's level is NaN, cast to int64 matches no level, so the row
stays zero; that cast is platform behaviour, kept apart from the main data.

Position-sensitive family ``ps`` (B=2, H=13, W=17, C_out=2, so C = 2*oh*ow input channels;
the boxes are ``pool_rois``), float32 and float64 (torchvision computes in the input dtype):
  ``ps_tags``, ``ps_params`` [n,6] float64: op (0 ps_roi_align, 1 ps_roi_pool), float64 (0/1),
  spatial_scale, sampling_ratio (ps_roi_align; 0 for ps_roi_pool), oh, ow
  per tag (e.g. ``ps_align_f32_s0p5_srm1_o3x3``): ``T_features_{nchw,nhwc}``, ``T_out_*``,
  ``T_cot_*``, ``T_dfeat_*`` as above. torchvision's 0/0 (adaptive ps_roi_align on a box
  empty along one axis) is stored as it comes, NaN.
"""

import os
from collections import OrderedDict

import numpy as np
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign, ps_roi_align, ps_roi_pool, roi_align, roi_pool

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "torchvision_golden.npz")


def nhwc(a):
    return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))


def fmt(v):
    s = ("%g" % v).replace(".", "p").replace("-", "m")
    return s


def align_boxes(rng):
    """Boxes in image pixels for a 13x17 (H x W) map at scale 1."""
    boxes = [
        ("normal", 0, (2.3, 1.7, 9.6, 8.2)),
        ("normal", 1, (5.5, 3.25, 12.75, 11.5)),
        ("normal_integer", 0, (1.0, 1.0, 3.0, 3.0)),
        ("whole_map", 1, (0.0, 0.0, 16.0, 12.0)),
        ("whole_map_plus1", 0, (0.0, 0.0, 17.0, 13.0)),
        ("crossing_topleft", 1, (-3.2, -2.1, 6.4, 5.5)),
        ("crossing_bottomright", 0, (10.3, 7.7, 20.9, 16.2)),
        ("crossing_left_edge", 1, (-1.3, 4.2, 2.6, 7.9)),
        ("leaving_topleft", 0, (-10.0, -8.0, -2.5, -1.5)),
        ("leaving_bottomright", 1, (18.5, 14.2, 25.0, 20.0)),
        ("near_minus1", 0, (-1.6, -1.4, 0.4, 0.6)),
        ("empty_point", 1, (4.0, 4.0, 4.0, 4.0)),
        ("empty_zero_width", 0, (6.5, 2.0, 6.5, 9.0)),
        ("inverted_both", 1, (9.0, 8.0, 3.0, 2.0)),
        ("inverted_y", 0, (3.0, 8.0, 9.0, 2.0)),
        ("inverted_x_slight", 1, (7.2, 3.0, 6.9, 9.5)),
        ("subpixel", 0, (4.1, 5.2, 4.4, 5.35)),
        ("subpixel_corner", 1, (0.2, 0.3, 0.7, 0.6)),
        ("thin", 0, (2.0, 5.0, 14.0, 5.3)),
        ("corner_cell", 1, (16.0, 12.0, 17.0, 13.0)),
        ("right_half", 0, (12.0, 0.0, 17.0, 13.0)),
        ("huge", 1, (-40.0, -30.0, 60.0, 45.0)),
        ("large_covering", 0, (-12.0, -9.0, 30.0, 22.0)),
    ]
    for i in range(10):
        x1 = rng.uniform(-2, 15)
        y1 = rng.uniform(-2, 11)
        w = rng.uniform(0.5, 10)
        h = rng.uniform(0.5, 8)
        boxes.append(("random", i % 2, (x1, y1, x1 + w, y1 + h)))
    kinds = np.array([k for k, _, _ in boxes])
    rois = np.array([[b, *c] for _, b, c in boxes], dtype=np.float32)
    return rois, kinds


def small_boxes():
    """Boxes for a 3x4 (H x W) map at scale 1."""
    boxes = [
        ("whole", 0, (0.0, 0.0, 4.0, 3.0)),
        ("inner", 0, (0.4, 0.3, 3.1, 2.6)),
        ("crossing", 0, (-1.5, -0.7, 2.2, 1.9)),
        ("larger", 0, (-2.0, -3.0, 7.0, 5.0)),
        ("subpixel", 0, (1.3, 1.1, 1.6, 1.2)),
        ("inverted", 0, (3.0, 2.0, 1.0, 0.5)),
    ]
    kinds = np.array([k for k, _, _ in boxes])
    rois = np.array([[b, *c] for _, b, c in boxes], dtype=np.float32)
    return rois, kinds


def large_boxes(rng):
    """Boxes 2x to 4x a 11x14 (H x W) map at scale 1; some centred, some crossing an edge."""
    H, W = 11.0, 14.0
    boxes = [
        ("centred_2x", 0, (-W / 2, -H / 2, 1.5 * W, 1.5 * H)),
        ("centred_3x", 1, (-W, -H, 2 * W, 2 * H)),
        ("centred_4x", 0, (-1.5 * W, -1.5 * H, 2.5 * W, 2.5 * H)),
        ("topleft_2x", 1, (-1.3 * W, -1.1 * H, 0.7 * W, 0.9 * H)),
        ("bottomright_3x", 0, (0.4 * W, 0.3 * H, 3.4 * W, 3.3 * H)),
        ("left_edge_4x", 1, (-3.2 * W, -1.4 * H, 0.8 * W, 2.6 * H)),
        ("wide_4x_2x", 0, (-1.6 * W, -0.4 * H, 2.4 * W, 1.6 * H)),
        ("tall_2x_4x", 1, (-0.3 * W, -2.7 * H, 1.7 * W, 1.3 * H)),
    ]
    for i in range(6):
        fx, fy = rng.uniform(2, 4), rng.uniform(2, 4)
        cx, cy = rng.uniform(-0.2 * W, 1.2 * W), rng.uniform(-0.2 * H, 1.2 * H)
        boxes.append(("random", i % 2, (cx - fx * W / 2, cy - fy * H / 2, cx + fx * W / 2, cy + fy * H / 2)))
    kinds = np.array([k for k, _, _ in boxes])
    rois = np.array([[b, *c] for _, b, c in boxes], dtype=np.float32)
    return rois, kinds


def pool_boxes(rng):
    """Boxes for roi_pool on the 13x17 map; many half-pixel coordinates (round-half-away)."""
    boxes = [
        ("normal", 0, (2.3, 1.7, 9.6, 8.2)),
        ("halves", 1, (2.5, 1.5, 9.5, 8.5)),
        ("neg_halves", 0, (-3.5, -0.5, 4.5, 6.5)),
        ("whole_map", 1, (0.0, 0.0, 16.0, 12.0)),
        ("crossing", 0, (10.3, 7.7, 20.9, 16.2)),
        ("leaving", 1, (18.5, 14.2, 25.0, 20.0)),
        ("leaving_neg", 0, (-10.0, -8.0, -2.5, -1.5)),
        ("empty_point", 1, (4.0, 4.0, 4.0, 4.0)),
        ("inverted", 0, (9.0, 8.0, 3.0, 2.0)),
        ("subpixel", 1, (4.1, 5.2, 4.4, 5.35)),
        ("single_cell", 0, (7.0, 7.0, 7.0, 7.0)),
        ("huge", 1, (-100.0, -80.0, 250.0, 190.0)),
        ("thin", 0, (2.0, 5.0, 14.0, 5.3)),
    ]
    for i in range(8):
        x1 = rng.uniform(-2, 15)
        y1 = rng.uniform(-2, 11)
        boxes.append(("random", i % 2, (x1, y1, x1 + rng.uniform(0.5, 10), y1 + rng.uniform(0.5, 8))))
    kinds = np.array([k for k, _, _ in boxes])
    rois = np.array([[b, *c] for _, b, c in boxes], dtype=np.float32)
    return rois, kinds


def run_align(d, fam, feats, rois, scales, srs, aligns, sizes, rng):
    tags, params = [], []
    x = torch.from_numpy(feats)
    r = torch.from_numpy(rois)
    for s in scales:
        for sr in srs:
            for al in aligns:
                for oh, ow in sizes:
                    tag = f"{fam}_s{fmt(s)}_sr{fmt(sr)}_al{int(al)}_o{oh}x{ow}"
                    xg = x.clone().requires_grad_(True)
                    cot = rng.standard_normal((rois.shape[0], feats.shape[1], oh, ow)).astype(np.float32)
                    # Boxes torchvision's CPU kernel rejects (one axis inverted in adaptive
                    # mode: gy*gx < 0 sizes a std::vector) are run one by one and marked.
                    fail = np.zeros(rois.shape[0], dtype=bool)
                    try:
                        out = roi_align(xg, r, (oh, ow), spatial_scale=s, sampling_ratio=sr, aligned=al)
                    except (RuntimeError, ValueError):  # the error type differs across torch versions
                        for k in range(rois.shape[0]):
                            try:
                                roi_align(x, r[k:k + 1], (oh, ow), spatial_scale=s, sampling_ratio=sr, aligned=al)
                            except (RuntimeError, ValueError):
                                fail[k] = True
                        keep = torch.from_numpy(~fail)
                        out_ok = roi_align(xg, r[keep], (oh, ow), spatial_scale=s, sampling_ratio=sr, aligned=al)
                        out = torch.full((rois.shape[0],) + tuple(out_ok.shape[1:]), float("nan"))
                        out[keep] = out_ok
                        out = out.clone()
                        cot[fail] = 0.0
                        out_ok_sum = (out_ok * torch.from_numpy(cot[~fail])).sum()
                        out_ok_sum.backward()
                    if not fail.any():
                        (out * torch.from_numpy(cot)).sum().backward()
                    o = out.detach().numpy()
                    gf = xg.grad.numpy()
                    d[f"{tag}_tvfail"] = fail
                    for name, a in (("out", o), ("cot", cot), ("dfeat", gf)):
                        d[f"{tag}_{name}_nchw"] = a
                        d[f"{tag}_{name}_nhwc"] = nhwc(a)
                    tags.append(tag)
                    params.append((s, sr, float(al), oh, ow))
    d[f"{fam}_tags"] = np.array(tags)
    d[f"{fam}_params"] = np.array(params, dtype=np.float64)


def run_ps(d, rois, rng):
    tags, params = [], []
    c_out = 2
    for dtype in (np.float32, np.float64):
        r = torch.from_numpy(rois.astype(dtype))
        for op, name in ((0, "align"), (1, "pool")):
            for s in (1.0, 0.5):
                for sr in ((2, -1) if op == 0 else (0,)):
                    for oh, ow in ((3, 3), (2, 4)):
                        feats = rng.standard_normal((2, c_out * oh * ow, 13, 17)).astype(dtype)
                        xg = torch.from_numpy(feats).requires_grad_(True)
                        if op == 0:
                            out = ps_roi_align(xg, r, (oh, ow), spatial_scale=s, sampling_ratio=sr)
                        else:
                            out = ps_roi_pool(xg, r, (oh, ow), spatial_scale=s)
                        cot = rng.standard_normal(out.shape).astype(dtype)
                        (torch.nan_to_num(out, nan=0.0) * torch.from_numpy(cot)).sum().backward()
                        bits = "f64" if dtype == np.float64 else "f32"
                        tag = f"ps_{name}_{bits}_s{fmt(s)}_sr{fmt(sr)}_o{oh}x{ow}"
                        for key, a in (("features", feats), ("out", out.detach().numpy()), ("cot", cot),
                                       ("dfeat", xg.grad.numpy())):
                            d[f"{tag}_{key}_nchw"] = a
                            d[f"{tag}_{key}_nhwc"] = nhwc(a)
                        tags.append(tag)
                        params.append((op, float(dtype == np.float64), s, sr, oh, ow))
    d["ps_tags"] = np.array(tags)
    d["ps_params"] = np.array(params, dtype=np.float64)


def main():
    torch.manual_seed(0)
    rng = np.random.default_rng(20240521)
    d = OrderedDict()
    d["torch_version"] = np.array(torch.__version__)
    d["torchvision_version"] = np.array(torchvision.__version__)
    d["numpy_version"] = np.array(np.__version__)

    # ---- roi_align, main map
    feats = rng.standard_normal((2, 3, 13, 17)).astype(np.float32)
    rois, kinds = align_boxes(rng)
    d["align_features_nchw"] = feats
    d["align_features_nhwc"] = nhwc(feats)
    d["align_rois"] = rois
    d["align_box_kind"] = kinds
    run_align(d, "align", feats, rois, scales=(1.0, 0.5), srs=(2, -1), aligns=(True, False),
              sizes=((3, 3), (2, 4)), rng=rng)

    # ---- roi_align, small map (output larger than the map)
    sfeats = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    srois, skinds = small_boxes()
    d["alignsmall_features_nchw"] = sfeats
    d["alignsmall_features_nhwc"] = nhwc(sfeats)
    d["alignsmall_rois"] = srois
    d["alignsmall_box_kind"] = skinds
    run_align(d, "alignsmall", sfeats, srois, scales=(1.0,), srs=(2, 0), aligns=(True, False),
              sizes=((4, 4), (2, 5)), rng=rng)

    # ---- roi_pool
    prois, pkinds = pool_boxes(rng)
    d["pool_rois"] = prois
    d["pool_box_kind"] = pkinds
    tags, params = [], []
    x = torch.from_numpy(feats)
    for s in (1.0, 0.5):
        for oh, ow in ((3, 3), (2, 4)):
            tag = f"pool_s{fmt(s)}_o{oh}x{ow}"
            xg = x.clone().requires_grad_(True)
            out = roi_pool(xg, torch.from_numpy(prois), (oh, ow), spatial_scale=s)
            cot = rng.standard_normal(out.shape).astype(np.float32)
            (out * torch.from_numpy(cot)).sum().backward()
            for name, a in (("out", out.detach().numpy()), ("cot", cot), ("dfeat", xg.grad.numpy())):
                d[f"{tag}_{name}_nchw"] = a
                d[f"{tag}_{name}_nhwc"] = nhwc(a)
            tags.append(tag)
            params.append((s, oh, ow))
    d["pool_tags"] = np.array(tags)
    d["pool_params"] = np.array(params, dtype=np.float64)

    pmap = np.array(
        [
            [0.88, 0.44, 0.14, 0.16, 0.37, 0.77, 0.96, 0.27],
            [0.19, 0.45, 0.57, 0.16, 0.63, 0.29, 0.71, 0.70],
            [0.66, 0.26, 0.82, 0.64, 0.54, 0.73, 0.59, 0.26],
            [0.85, 0.34, 0.76, 0.84, 0.29, 0.75, 0.62, 0.25],
            [0.32, 0.74, 0.21, 0.39, 0.34, 0.03, 0.33, 0.48],
            [0.20, 0.14, 0.16, 0.13, 0.73, 0.65, 0.96, 0.32],
            [0.19, 0.69, 0.09, 0.86, 0.88, 0.07, 0.01, 0.48],
            [0.83, 0.24, 0.97, 0.04, 0.24, 0.35, 0.50, 0.91],
        ],
        dtype=np.float32,
    )
    pex_rois = np.array([[0, 0, 3, 6, 7]], dtype=np.float32)
    d["poolex_map"] = pmap
    d["poolex_rois"] = pex_rois
    d["poolex_out"] = roi_pool(torch.from_numpy(pmap)[None, None], torch.from_numpy(pex_rois), (2, 2)).numpy()[0, 0]

    # ---- MultiScaleRoIAlign
    H, W = 128, 160
    names = ["p2", "p3", "p4", "p5"]
    levels = OrderedDict()
    for i, (n, k) in enumerate(zip(names, (2, 3, 4, 5))):
        lv = rng.standard_normal((2, 3, H // 2**k, W // 2**k)).astype(np.float32)
        levels[n] = torch.from_numpy(lv)
        d[f"msra_level{i}_nchw"] = lv
        d[f"msra_level{i}_nhwc"] = nhwc(lv)
    img0 = [
        (10.0, 12.0, 20.0, 22.0),  # tiny -> k_min
        (30.0, 20.0, 86.0, 76.0),  # 56x56: exactly level 2 (log2 = -2)
        (8.0, 4.0, 120.0, 116.0),  # 112x112: exactly level 3
        (0.0, 0.0, 160.0, 128.0),  # whole image
        (-60.0, -50.0, 164.0, 174.0),  # 224x224: exactly level 4, crossing
        (-200.0, -220.0, 300.0, 280.0),  # huge: level 5 (clamped)
        (50.0, 60.0, 50.0, 60.0),  # empty: area 0 -> k_min
        (90.0, 70.0, 60.0, 40.0),  # inverted on both axes: positive area
        (150.0, 120.0, 175.0, 140.0),  # crossing bottom-right
    ]
    img1 = []
    for _ in range(10):
        w = float(np.exp(rng.uniform(np.log(4), np.log(400))))
        h = w * rng.uniform(0.5, 2.0)
        x1 = rng.uniform(-20, W - 10)
        y1 = rng.uniform(-20, H - 10)
        img1.append((x1, y1, x1 + w, y1 + h))
    b0 = np.array(img0, dtype=np.float32)
    b1 = np.array(img1, dtype=np.float32)
    d["msra_image_size"] = np.array([H, W], dtype=np.int64)
    d["msra_boxes_img0"] = b0
    d["msra_boxes_img1"] = b1
    boxes = [torch.from_numpy(b0), torch.from_numpy(b1)]
    tags, params = [], []
    for sr in (2, 0):
        for oh, ow in ((7, 7), (2, 4)):
            m = MultiScaleRoIAlign(names, (oh, ow), sr)
            out = m(levels, boxes, [(H, W), (H, W)]).numpy()
            tag = f"msra_sr{sr}_o{oh}x{ow}"
            d[f"{tag}_out_nchw"] = out
            d[f"{tag}_out_nhwc"] = nhwc(out)
            tags.append(tag)
            params.append((sr, oh, ow))
    d["msra_tags"] = np.array(tags)
    d["msra_params"] = np.array(params, dtype=np.float64)
    d["msra_scales"] = np.array(m.scales, dtype=np.float64)
    d["msra_rois"] = torchvision.ops.poolers._convert_to_roi_format(boxes).numpy()
    d["msra_levels"] = m.map_levels(boxes).numpy() + m.map_levels.k_min

    bneg = np.array([(50.0, 10.0, 20.0, 70.0), (20.0, 70.0, 50.0, 10.0), (10.0, 10.0, 60.0, 60.0)],
                    dtype=np.float32)
    m = MultiScaleRoIAlign(names, (2, 2), 2)
    lv0 = OrderedDict((n, t[:1]) for n, t in levels.items())
    out = m(lv0, [torch.from_numpy(bneg)], [(H, W)]).numpy()
    d["msraneg_boxes_img0"] = bneg
    d["msraneg_rois"] = torchvision.ops.poolers._convert_to_roi_format([torch.from_numpy(bneg)]).numpy()
    d["msraneg_out_nchw"] = out
    d["msraneg_out_nhwc"] = nhwc(out)

    # ---- roi_align, boxes larger than the map (own generator: the data above is unchanged)
    lrng = np.random.default_rng(20261201)
    lfeats = lrng.standard_normal((2, 3, 11, 14)).astype(np.float32)
    lrois, lkinds = large_boxes(lrng)
    d["alignlarge_features_nchw"] = lfeats
    d["alignlarge_features_nhwc"] = nhwc(lfeats)
    d["alignlarge_rois"] = lrois
    d["alignlarge_box_kind"] = lkinds
    run_align(d, "alignlarge", lfeats, lrois, scales=(1.0, 0.5), srs=(0, -1), aligns=(True, False),
              sizes=((1, 1), (2, 3), (4, 4)), rng=lrng)

    # ---- ps_roi_align / ps_roi_pool (own generator: the data above is unchanged)
    run_ps(d, prois, np.random.default_rng(20261202))

    np.savez_compressed(OUT, **d)
    print(f"wrote {OUT}: {len(d)} arrays, {os.path.getsize(OUT)} bytes, torchvision {torchvision.__version__}")


if __name__ == "__main__":
    main()
