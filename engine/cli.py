"""`sharp-runpod` command line: predict splats for images and folders of images, convert splat
files between formats."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.io.checkpoint import TINY_UNTRAINED, CheckpointError
from engine.io.images import decode_image
from engine.results import (
    PLY_LAYOUTS,
    OptionError,
    OutputOptions,
    check_finite,
    encode_prediction,
)
from engine.runtime.numerics import configure_numerics
from engine.runtime.predictor import SharpPredictor
from engine.settings import DEFAULT_CHECKPOINT_URL, DEVICES, Settings, SettingsError
from engine.splats.formats import FORMATS, decode, encode
from engine.splats.formats.sog import write_sog
from engine.splats.formats.spz import DEFAULT_VERSION, VERSIONS
from engine.splats.gaussians import Gaussians

logger = logging.getLogger("sharp-runpod")
# The command line's name for each OutputOptions field.
OPTION_FLAGS = {
    "format": "--format",
    "ply_layout": "--ply-layout",
    "spz_version": "--spz-version",
    "max_gaussians": "--max-gaussians",
    "min_opacity": "--min-opacity",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharp-runpod", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="write one .ply per input image")
    predict.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    predict.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    predict.add_argument(
        "--checkpoint",
        default=None,
        help=f"local .pt file, http(s) URL, hf://owner/repo[/file], or '{TINY_UNTRAINED}' "
        f"(default: Apple's published checkpoint, {DEFAULT_CHECKPOINT_URL})",
    )
    predict.add_argument(
        "--device", default=None, choices=DEVICES, help="default: $SHARP_DEVICE, else auto"
    )
    predict.add_argument(
        "--focal-px", type=float, default=None, help="focal length in pixels (default: from EXIF)"
    )
    predict.add_argument("--format", default="ply", choices=FORMATS, help="output file format")
    predict.add_argument(
        "--ply-layout",
        default="standard",
        choices=PLY_LAYOUTS,
        help="standard: vertex element only, read by every viewer; sharp: Apple's layout with "
        "camera metadata elements",
    )
    predict.add_argument("--spz-version", type=int, default=DEFAULT_VERSION, choices=VERSIONS)
    predict.add_argument(
        "--min-opacity", type=float, default=None, help="drop Gaussians below this opacity"
    )
    predict.add_argument(
        "--max-gaussians", type=int, default=None, help="keep at most this many, the most visible"
    )
    predict.set_defaults(run=run_predict)
    convert = commands.add_parser(
        "convert",
        help="convert a splat file (.ply, .spz, .splat, .sog) to the format of -o's suffix",
    )
    convert.add_argument("input", type=Path, help="a 3DGS .ply (SH degree 0), .spz, .splat or .sog")
    convert.add_argument(
        "-o", "--output", type=Path, required=True, help=f"output file: .{', .'.join(FORMATS)}"
    )
    convert.add_argument("--spz-version", type=int, default=DEFAULT_VERSION, choices=VERSIONS)
    convert.add_argument(
        "--3dgs-model",
        dest="gs_model",
        action="store_true",
        help="write -o as a model folder of the original 3D Gaussian Splatting code, for its "
        "SIBR viewer (SIBR_gaussianViewer_app -m FOLDER)",
    )
    convert.add_argument(
        "--sh-degree", type=int, default=3, choices=range(4), help="with --3dgs-model"
    )
    convert.set_defaults(run=run_convert)
    view = commands.add_parser(
        "view", help="show a splat file (.ply, .spz, .splat, .sog) in a browser, upright"
    )
    view.add_argument("file", type=Path, help="the splat file")
    view.add_argument("--port", type=int, default=0, help="local port (default: a free one)")
    view.add_argument("--no-browser", action="store_true", help="only print the address")
    view.set_defaults(run=run_view)
    commands.add_parser(
        "build-engine", help="export the network and compile it (python export/build_engine.py)"
    )
    return parser


def collect_images(inputs: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(file, output stem relative to the output folder) for files and folder contents.

    Folders are walked recursively; their structure is kept in the output. Whether a file
    is an image is decided by decoding it, not by its suffix.
    """
    pairs: list[tuple[Path, Path]] = []
    for item in inputs:
        if item.is_dir():
            for path in sorted(p for p in item.rglob("*") if p.is_file()):
                relative = path.relative_to(item)
                if not any(part.startswith(".") for part in relative.parts):
                    pairs.append((path, relative))
        else:
            pairs.append((item, Path(item.name)))
    # Two inputs with one stem (photo.jpg, photo.png) must not overwrite each other.
    seen: set[Path] = set()
    unique = []
    for path, relative in pairs:
        stem = relative.with_suffix("")
        if stem in seen:
            stem = relative
        seen.add(stem)
        unique.append((path, stem))
    return unique


def run_predict(args: argparse.Namespace) -> int:
    images = collect_images(args.inputs)
    missing = [str(path) for path, _ in images if not path.exists()]
    if missing:
        logger.error("no such file: %s", ", ".join(missing))
        return 2
    if not images:
        logger.error("no input files found in %s", ", ".join(map(str, args.inputs)))
        return 2
    if args.focal_px is not None and not (math.isfinite(args.focal_px) and args.focal_px > 0):
        logger.error("--focal-px must be a positive number of pixels")
        return 2
    try:
        options = OutputOptions(
            format=args.format,
            ply_layout=args.ply_layout,
            spz_version=args.spz_version,
            max_gaussians=args.max_gaussians,
            min_opacity=args.min_opacity,
        )
    except OptionError as error:
        logger.error("%s", error.describe(OPTION_FLAGS[error.option]))
        return 2
    try:
        # The CLI serves with an engine that is already built (sharp-runpod build-engine);
        # building one is minutes of work a one-off command should not start behind the user.
        settings = dataclasses.replace(
            args.settings,
            checkpoint=args.checkpoint or args.settings.checkpoint,
            device=args.device or args.settings.device,
            engine_build=False,
        )
        predictor = SharpPredictor.from_settings(settings)
    except (CheckpointError, RuntimeError) as error:
        logger.error("%s", error)
        return 2
    label = (
        " [UNTRAINED tiny model: not a real reconstruction]"
        if predictor.checkpoint.untrained
        else ""
    )
    failures = 0
    progress = tqdm(images, unit="image", disable=len(images) < 2)
    for path, stem in progress:
        start = time.perf_counter()
        try:
            image = decode_image(
                path.read_bytes(),
                focal_length_px=args.focal_px,
                max_pixels=settings.max_pixels,
                focal_length_field="--focal-px",
            )
            prediction = predictor.predict(image)
            result = encode_prediction(prediction, options)
            encoded = result.splat
            target = args.output / stem.parent / (stem.name + encoded.extension)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(encoded.data)
        except (ValueError, OSError) as error:  # bad image bytes (ImageDecodeError), I/O
            failures += 1
            tqdm.write(f"{path}: FAILED: {error}", file=sys.stderr)
            continue
        kept = (
            ""
            if result.num_gaussians == len(prediction.gaussians)
            else f" (of {len(prediction.gaussians):,})"
        )
        tqdm.write(
            f"{path}: {result.num_gaussians:,} Gaussians{kept}, "
            f"{prediction.image_width}x{prediction.image_height}, "
            f"focal {prediction.focal_length_px:.1f} px ({prediction.focal_length_source}), "
            f"{prediction.backend}/{prediction.precision}, "
            f"{time.perf_counter() - start:.2f} s -> {target}{label}"
        )
    if failures:
        logger.error("%d of %d images failed", failures, len(images))
    return 1 if failures else 0


def run_convert(args: argparse.Namespace) -> int:
    """One splat file to another format: 2 for bad arguments, 1 for a file that fails."""
    source, target = args.input, args.output
    source_format, target_format = (p.suffix.lower().lstrip(".") for p in (source, target))
    if args.gs_model:
        return convert_to_gs_model(args)
    if target_format not in FORMATS:
        logger.error("-o must end in .%s, got %r", ", .".join(FORMATS), target.name)
        return 2
    if source_format not in FORMATS:
        logger.error("cannot read %s: the input must end in .%s", source, ", .".join(FORMATS))
        return 2
    if not source.is_file():
        logger.error("no such file: %s", source)
        return 2
    if target.resolve() == source.resolve():
        logger.error("the output would overwrite the input %s", source)
        return 2
    start = time.perf_counter()
    try:
        gaussians = decode(source_format, source.read_bytes())
        if len(gaussians) == 0:
            raise ValueError("the file holds no Gaussians")
        check_finite(gaussians, "the file")
        if target_format == "sog":  # no camera: positions held to the Gaussians' sizes
            data = write_sog(gaussians.contiguous())
        else:
            # Image size and focal length are metadata of the sharp .ply layout only;
            # convert writes the standard layout, so they are placeholders.
            data = encode(
                gaussians,
                target_format,
                image_width=1,
                image_height=1,
                focal_length_px=1.0,
                spz_version=args.spz_version,
            ).data
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    except (ValueError, OSError) as error:  # unreadable or malformed input, I/O
        logger.error("%s: conversion failed: %s", source, error)
        return 1
    print(
        f"{source}: {len(gaussians):,} Gaussians -> {target} ({len(data):,} bytes, "
        f"{time.perf_counter() - start:.2f} s)"
    )
    return 0


def convert_to_gs_model(args: argparse.Namespace) -> int:
    """A splat file to the original 3DGS code's model folder (engine.splats.formats.gs_model).

    The camera comes from a sharp-layout .ply's intrinsics; other files get a 1024 x 1024
    view with a 60 degree field of view (only the viewer's start-up camera)."""
    from engine.splats.formats.gs_model import write_gs_model

    source, folder = args.input, args.output
    source_format = source.suffix.lower().lstrip(".")
    if source_format not in FORMATS or not source.is_file():
        logger.error("cannot read %s: give a .%s file", source, ", .".join(FORMATS))
        return 2
    try:
        data = source.read_bytes()
        gaussians = decode(source_format, data)
        camera = {"image_width": 1024, "image_height": 1024, "focal_length_px": 886.8}
        if source_format == "ply":
            from engine.splats.formats.ply import read_ply

            elements = read_ply(data).elements
            if "intrinsic" in elements and "image_size" in elements:
                width, height = (int(v) for v in np.ravel(elements["image_size"])[:2])
                focal = float(np.ravel(elements["intrinsic"])[0])
                camera = {"image_width": width, "image_height": height, "focal_length_px": focal}
        ply = write_gs_model(gaussians, folder, **camera, sh_degree=args.sh_degree)
    except (ValueError, OSError) as error:
        logger.error("%s: conversion failed: %s", source, error)
        return 1
    print(
        f"{source}: {len(gaussians):,} Gaussians -> {ply} (open: SIBR_gaussianViewer_app -m {folder})"
    )
    return 0


def run_view(args: argparse.Namespace) -> int:
    from engine.settings import HttpSettings
    from engine.viewer.serve import ViewError, check_viewable, view

    try:
        modules = HttpSettings.from_env().viewer_modules
        format = check_viewable(args.file)
        fovy = _fitted_fovy(decode(format, args.file.read_bytes()))
        view(
            args.file,
            port=args.port,
            modules=modules,
            open_browser=not args.no_browser,
            fovy_deg=fovy,
        )
    except (ViewError, SettingsError, OSError, ValueError) as error:
        print(f"sharp-runpod: {error}", file=sys.stderr)
        return 2
    return 0


def _fitted_fovy(gaussians: Gaussians) -> float | None:
    """The vertical field of view that frames the splat as its photo did, from the origin.

    Our files keep the photo's camera at the origin (the readers give OpenCV axes), and the
    Gaussians fill the frustum of its pixels: nearly all lie within the photo's field of view.
    """
    y, z = gaussians.means[:, 1], gaussians.means[:, 2]
    ahead = z > 0
    if not bool(ahead.any()):
        return None
    half = torch.quantile(
        (y[ahead] / z[ahead]).abs().float()[:: max(1, int(ahead.sum()) // 100_000)], 0.999
    )
    return math.degrees(2 * math.atan(float(half)))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build-engine"]:  # the build tool, in its own process, with its own options
        return subprocess.call([sys.executable, "-m", "export.build_engine", *argv[1:]])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Each image's line names its backend; the runtime's full report is for worker logs.
    logging.getLogger("engine.runtime.serving").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        args.settings = Settings.from_env().engine
    except SettingsError as error:
        print(f"sharp-runpod: {error}", file=sys.stderr)
        return 2
    configure_numerics()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
