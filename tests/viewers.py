"""Independent readers and a real viewer of splat files, for the end-to-end tests.

Nothing here is the project's code: the tools are other people's, installed from npm by
`make tests/js/node_modules/.installed` (pinned in tests/js/package-lock.json), and Debian's
Chromium (`apt-get install chromium`):

  * splat_transform_read: PlayCanvas's splat-transform (a reader and converter of .ply, .spz,
    .splat, .sog) prints its Gaussian count and per-column statistics (`--stats json`).
  * render_in_spark: World Labs' Spark renders the file with three.js's WebGL in headless
    Chromium (WebGL2 on SwiftShader, no GPU needed), one frame from a camera at the origin.

Spark draws a file's coordinates as they are (no axis conversion for any format, checked with
Spark 2.2.0 on this project's files), in three.js's world: y up, cameras looking down their -z.
Which camera sees a file as the photo was taken therefore depends on the axes the file is in
(POSES, CAPTURE_POSE): for the .ply, .splat and .sog (OpenCV axes) a camera turned half a turn
about x, looking down +z with -y up; for the .spz (RUB axes) three.js's own camera. The other
pose sees nothing: the whole scene is behind it. splat-transform likewise decodes every
format's stored coordinates without converting them, so its .spz statistics have y and z
negated relative to the .ply's.

When node, the npm packages or Chromium are missing, the helpers call pytest.skip with the
reason; `make test` installs all three, so CI runs them.
"""

from __future__ import annotations

import functools
import io
import json
import math
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
import pytest
from PIL import Image

JS_DIR = Path(__file__).resolve().parent / "js"
NODE_MODULES = JS_DIR / "node_modules"
SPLAT_TRANSFORM_CLI = NODE_MODULES / "@playcanvas" / "splat-transform" / "bin" / "cli.mjs"
CHROMIUM = Path("/usr/bin/chromium")

# The camera at the origin, in the file's own axes (render.html has the same names):
#   "opencv": looking along +z, y down, x right (3DGS .ply files, .splat: OpenCV/COLMAP axes);
#   "opengl": looking along -z, y up, x right (three.js's default camera; RUB files).
POSES = ("opencv", "opengl")
# The pose that shows each format of this project as the photo was taken. The .ply and .splat
# writers keep the Gaussians' OpenCV axes; the .spz writer converts them to RUB (its spec's
# axes). The .sog writer keeps OpenCV axes, as PlayCanvas's .ply -> .sog conversion does.
CAPTURE_POSE = {"ply": "opencv", "splat": "opencv", "spz": "opengl", "sog": "opencv"}


# --- tools -----------------------------------------------------------------------------------


@functools.cache
def _node() -> str | None:
    return shutil.which("node")


def require_splat_transform() -> list[str]:
    """The command that runs splat-transform, or skip the test saying what is missing."""
    node = _node()
    if node is None:
        pytest.skip("node is not installed (make test installs it with the npm packages)")
    if not SPLAT_TRANSFORM_CLI.is_file():
        pytest.skip(
            f"{SPLAT_TRANSFORM_CLI} is missing: run `make tests/js/node_modules/.installed`"
        )
    return [node, str(SPLAT_TRANSFORM_CLI)]


def require_spark() -> tuple[str, Path]:
    """node and Chromium for render_in_spark, or skip the test saying what is missing."""
    node = _node()
    if node is None:
        pytest.skip("node is not installed (make test installs it with the npm packages)")
    for package in ("@sparkjsdev/spark", "three", "playwright-core"):
        if not (NODE_MODULES / package / "package.json").is_file():
            pytest.skip(
                f"npm package {package} is missing: run `make tests/js/node_modules/.installed`"
            )
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make test does, as root)")
    return node, CHROMIUM


@functools.cache
def npm_package_version(package: str) -> str:
    return json.loads((NODE_MODULES / package / "package.json").read_text())["version"]


def splat_transform_version() -> str:
    require_splat_transform()
    return npm_package_version("@playcanvas/splat-transform")


# --- splat-transform -------------------------------------------------------------------------


def splat_transform_read(path: str | Path, timeout_s: float = 300) -> dict[str, Any]:
    """What splat-transform reads in a splat file.

    Returns {"format", "count", "sh_bands", "columns": {name: {"min", "max", "median", "mean",
    "stdDev", "nanCount", "infCount"}}, "raw": its whole JSON}. splat-transform decodes every
    format into .ply-style columns (x y z, rot_0..3 as w x y z, scale_0..2, opacity, f_dc_0..2)
    with no change of axes. Its JSON shows scale_* as exp(stored), opacity as sigmoid(stored)
    and f_dc_* as 0.5 + SH_C0 f_dc, and applies that display transform to every statistic,
    stdDev included (so a scale's "stdDev" is exp of the log scales' standard deviation).
    Min, max, mean and stdDev are exact; the median comes from a 1024-bin histogram.
    """
    command = [*require_splat_transform(), "--quiet", str(path), "--stats", "json", "null"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"splat-transform failed ({done.returncode}) on {path}:\n{done.stderr}")
    start = done.stdout.find("{")
    if start < 0:
        raise RuntimeError(f"splat-transform printed no JSON for {path}:\n{done.stdout}")
    raw = json.loads(done.stdout[start:])
    (stats,) = raw["stats"]  # one level of detail
    data = stats["data"]
    keys = [k for k in data if k != "histogram"]
    columns = {name: {key: data[key][i] for key in keys} for i, name in enumerate(stats["columns"])}
    if stats["numGaussians"] != raw["numGaussians"]:
        raise RuntimeError(f"splat-transform's counts disagree: {raw}")
    return {
        "format": raw["format"],
        "count": raw["numGaussians"],
        "sh_bands": raw["shBands"],
        "columns": columns,
        "raw": raw,
    }


# --- Spark in headless Chromium --------------------------------------------------------------

_MEDIA_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
}


@contextmanager
def _serve(splat: Path) -> Iterator[str]:
    """tests/js/ and the splat file (as /splat/<name>) on 127.0.0.1; yields the base URL."""
    splat = splat.resolve()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(JS_DIR), **kwargs)

        def translate_path(self, path: str) -> str:
            if path.split("?")[0] == f"/splat/{quote(splat.name)}":
                return str(splat)
            return super().translate_path(path)

        def guess_type(self, path: str | Path) -> str:
            suffix = Path(path).suffix
            return _MEDIA_TYPES.get(suffix, "application/octet-stream")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def vertical_fov_deg(focal_length_px: float, image_height: int) -> float:
    """The pinhole camera's vertical field of view, as three.js's PerspectiveCamera.fov."""
    return math.degrees(2 * math.atan(image_height / (2 * focal_length_px)))


def render_in_spark(
    path: str | Path,
    *,
    width: int,
    height: int,
    fovy_deg: float,
    pose: str,
    save_to: str | Path | None = None,
    info: dict[str, Any] | None = None,
    timeout_s: float = 300,
    at: tuple[float, float, float] | None = None,
    target: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """One frame of the splat file in Spark: an (height, width, 3) uint8 RGB image.

    The camera sits at the origin of the file's coordinates, in `pose` (one of POSES), with
    vertical field of view fovy_deg; the background is black. `at` (with `target`) moves it
    there, looking at target, up as in the pose (a novel view). save_to keeps the PNG; info,
    when given, receives what the page reported: numSplats (as Spark loaded them), timings
    (load_ms, sort_ms, draw_ms) and the browser's console.
    """
    if pose not in POSES:
        raise ValueError(f"pose must be one of {POSES}, got {pose!r}")
    node, chromium = require_spark()
    path = Path(path)
    with _serve(path) as base, _temporary_png(save_to) as png:
        fields = {
            "file": f"/splat/{quote(path.name)}",
            "width": width,
            "height": height,
            "fovy": f"{fovy_deg:.6f}",
            "pose": pose,
        }
        if at is not None and target is not None:
            fields.update(at=",".join(map(repr, at)), target=",".join(map(repr, target)))
        query = urlencode(fields)
        spec = {
            "url": f"{base}/render.html?{query}",
            "out": str(png),
            "chromium": str(chromium),
            "timeoutMs": int(timeout_s * 1000),
        }
        done = subprocess.run(
            [node, str(JS_DIR / "render.mjs"), json.dumps(spec)],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout_s + 60,
            cwd=JS_DIR,
        )
        if done.returncode != 0:
            raise RuntimeError(f"Spark render of {path} failed:\n{done.stdout}\n{done.stderr}")
        image = Image.open(io.BytesIO(png.read_bytes())).convert("RGB")
        if info is not None:
            info.update(json.loads(done.stdout.strip().splitlines()[-1]))
    if image.size != (width, height):
        raise RuntimeError(f"Spark rendered {image.size}, asked for {(width, height)}")
    return np.asarray(image)


@contextmanager
def _temporary_png(save_to: str | Path | None) -> Iterator[Path]:
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        yield Path(save_to)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="spark-render-") as folder:
        yield Path(folder) / "frame.png"
