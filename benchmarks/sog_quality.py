"""How a .sog looks next to the exact .ply of the same prediction, in a real viewer.

Run: .venv/bin/python benchmarks/sog_quality.py [--checkpoint SPEC] [--image PATH] [--scale S]

Predicts one image (default: the built-in tiny model on samples/coffee.jpg; any checkpoint the
CLI takes), writes the .ply (float32, exact) and .sog files of the same Gaussians: the default,
every budget level, the containers at their finest, and splat-transform's .sog of the .ply.
Spark (three.js) renders each in headless Chromium (tests/viewers.py) from the capture camera
and two novel viewpoints (beside and above the camera, turned to the scene's median depth),
and the frames are compared with the .ply's: PSNR (dB) and SSIM. Needs node, the npm packages
of tests/js and Chromium; a render takes tens of seconds on a CPU (SwiftShader), so
--scale renders smaller frames (default 0.5 of the image).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.io.checkpoint import TINY_UNTRAINED
from engine.io.images import decode_image
from engine.runtime.predictor import SharpPredictor
from engine.splats.formats import encode
from engine.splats.formats.sog import MAX_LEVEL, write_sog
from tests import viewers
from tests.render_metrics import psnr, ssim

# Novel viewpoints as fractions of the median depth d: the camera at (x, y, z) d, looking at
# (0, 0, d). OpenCV axes: x right, y down.
NOVEL = {"right": (0.15, 0.0, 0.05), "above": (-0.05, -0.15, 0.0)}


def cameras(median_depth: float) -> dict[str, tuple | None]:
    d = median_depth
    views: dict[str, tuple | None] = {"capture": None}
    for name, (x, y, z) in NOVEL.items():
        views[name] = ((x * d, y * d, z * d), (0.0, 0.0, d))
    return views


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=TINY_UNTRAINED)
    parser.add_argument("--image", type=Path, default=ROOT / "samples" / "coffee.jpg")
    parser.add_argument("--scale", type=float, default=0.5, help="render size / image size")
    parser.add_argument("--levels", default=",".join(map(str, range(MAX_LEVEL + 1))))
    parser.add_argument("--keep", type=Path, default=None, help="keep files and frames here")
    args = parser.parse_args()

    predictor = SharpPredictor.from_checkpoint(args.checkpoint, "cpu")
    prediction = predictor.predict(decode_image(args.image.read_bytes()))
    g, f = prediction.gaussians, prediction.focal_length_px
    folder = args.keep or Path(tempfile.mkdtemp(prefix="sog-quality-"))
    folder.mkdir(parents=True, exist_ok=True)
    camera = dict(
        image_width=prediction.image_width, image_height=prediction.image_height, focal_length_px=f
    )
    ply = folder / "exact.ply"
    ply.write_bytes(encode(g, "ply", **camera).data)
    files = {"ply": ply}
    for level in [int(v) for v in args.levels.split(",")]:
        files[f"level {level}" + (" (default)" if level == 0 else "")] = folder / f"l{level}.sog"
        files[next(reversed(files))].write_bytes(write_sog(g, level=level, focal_length_px=f))
    files["finest containers"] = folder / "finest.sog"
    files["finest containers"].write_bytes(write_sog(g, level=None))
    reference_sog = folder / "splat-transform.sog"
    subprocess.run(
        [*viewers.require_splat_transform(), "--quiet", "-w", str(ply), str(reference_sog)],
        check=True,
    )
    files[f"splat-transform {viewers.splat_transform_version()}"] = reference_sog

    width = round(prediction.image_width * args.scale)
    height = round(prediction.image_height * args.scale)
    fovy = viewers.vertical_fov_deg(f, prediction.image_height)
    views = cameras(float(g.means[:, 2].median()))
    frames: dict[tuple[str, str], object] = {}
    for label, path in files.items():
        for view, pose in views.items():
            start = time.perf_counter()
            frames[label, view] = viewers.render_in_spark(
                path,
                width=width,
                height=height,
                fovy_deg=fovy,
                pose="opencv",
                save_to=folder / f"{path.stem}-{view}.png",
                at=pose[0] if pose else None,
                target=pose[1] if pose else None,
            )
            print(f"rendered {label} / {view} in {time.perf_counter() - start:.0f} s", flush=True)

    print(
        f"\n{args.checkpoint} on {args.image.name}: {len(g):,} Gaussians, frames {width}x{height}"
    )
    header = " | ".join(f"{v} PSNR / SSIM" for v in views)
    print(f"| file | bytes | {header} |")
    print("| --- | --- |" + " --- |" * len(views))
    for label, path in files.items():
        if label == "ply":
            continue
        cells = " | ".join(
            f"{psnr(frames[label, v], frames['ply', v]):.1f} / "
            f"{ssim(frames[label, v], frames['ply', v]):.4f}"
            for v in views
        )
        print(f"| {label} | {path.stat().st_size:,} | {cells} |")
    print(f"\nfiles and frames in {folder}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
