"""Draw where RoIPool, RoIWarp, RoIAlign and rotated RoIAlign read a feature map, side by side.

The geometry (regions, bins, sampling points, the bilinear neighbours of one sample) follows
docs/semantics.md and is checked against the library before drawing; rotated RoIAlign's comes
from the library's own geometry (see jax_roi.tools.figures).

    python examples/sampling_picture.py --out docs/sampling_picture.png
    python examples/sampling_picture.py --box 0.7 2.2 5.4 4.9 --output-size 3 --legacy --out legacy.png
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from jax_roi.tools.figures import DEFAULT_BOX, DEFAULT_MAP, DEFAULT_ROTATED_BOX, draw_sampling_picture  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sampling_picture.png", help="PNG to write")
    p.add_argument("--box", type=float, nargs=4, default=list(DEFAULT_BOX), metavar=("X1", "Y1", "X2", "Y2"),
                   help="the box, in image pixels")
    p.add_argument("--rotated-box", type=float, nargs=5, default=list(DEFAULT_ROTATED_BOX),
                   metavar=("XC", "YC", "W", "H", "ANGLE"),
                   help="rotated RoIAlign's oriented box, in image pixels, angle in degrees counter-clockwise")
    p.add_argument("--map-size", type=int, nargs=2, default=list(DEFAULT_MAP), metavar=("H", "W"))
    p.add_argument("--spatial-scale", type=float, default=1.0)
    p.add_argument("--output-size", type=int, nargs="+", default=[2], help="oh [ow]")
    p.add_argument("--sampling-ratio", type=int, default=2, help="samples per bin side (<= 0: adaptive)")
    p.add_argument("--legacy", action="store_true", help="RoIAlign with aligned=False (no half-pixel offset)")
    p.add_argument("--binning", choices=("caffe", "floor"), default="caffe", help="RoIPool's bin rule")
    p.add_argument("--highlight", type=int, nargs=4, default=[0, 0, 0, 0], metavar=("PH", "PW", "IY", "IX"),
                   help="the sample whose bilinear neighbours are drawn")
    args = p.parse_args(argv)
    size = args.output_size[0] if len(args.output_size) == 1 else tuple(args.output_size[:2])
    geos = draw_sampling_picture(args.out, args.box, size, map_size=args.map_size, spatial_scale=args.spatial_scale,
                                 sampling_ratio=args.sampling_ratio, aligned=not args.legacy, binning=args.binning,
                                 highlight=args.highlight, rotated_box=args.rotated_box)
    for method, g in geos.items():
        extra = f", {g['grid'][0]}x{g['grid'][1]} samples per bin" if "grid" in g else ""
        if "region" in g:
            region = ", ".join(f"{v:g}" for v in g["region"])
            print(f"{method:<9} region ({region}){extra}")
        else:  # the oriented box: its corners
            corners = " ".join(f"({x:.2f}, {y:.2f})" for x, y in g["corners"])
            print(f"{method} corners {corners}{extra}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
