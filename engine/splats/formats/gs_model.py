"""A model folder of the original 3D Gaussian Splatting code, for its SIBR viewer.

The original viewer (SIBR_gaussianViewer_app -m FOLDER) and the Python `GaussianModel.load_ply`
read a trained model's folder, not a bare .ply:

  FOLDER/cfg_args                                      Namespace(..., sh_degree=D, ...)
  FOLDER/point_cloud/iteration_N/point_cloud.ply       binary little-endian vertex rows
  FOLDER/cameras.json                                  the cameras, one object each

SIBR reads each vertex as a fixed struct: position, normal (nx, ny, nz), the (D + 1)^2 x 3
SH coefficients (f_dc_0..2, then f_rest_* channel by channel), opacity (logit), scale_0..2
(log), rot_0..3 (w, x, y, z). `load_ply` asserts 3 (D + 1)^2 - 3 f_rest properties. SHARP
predicts colour only (degree 0): normals and f_rest are zeros, and D defaults to 3, the
original training default that every build of the viewer reads. The Gaussians stay in OpenCV
axes, the original code's own camera convention, with the input camera at the origin.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.splats.formats.ply import read_ply, write_ply
from engine.splats.gaussians import Gaussians

DEFAULT_SH_DEGREE = 3
ITERATION = 30_000  # the original training's last iteration, where the viewer looks first


def vertex_names(sh_degree: int) -> list[str]:
    """The vertex properties in the original code's order."""
    rest = 3 * (sh_degree + 1) ** 2 - 3
    return [
        *("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"),
        *(f"f_rest_{i}" for i in range(rest)),
        *("opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"),
    ]


def write_gs_model(
    gaussians: Gaussians,
    folder: Path,
    *,
    image_width: int,
    image_height: int,
    focal_length_px: float,
    sh_degree: int = DEFAULT_SH_DEGREE,
) -> Path:
    """Write the model folder; returns the path of its point_cloud.ply."""
    if not 0 <= sh_degree <= 3:
        raise ValueError(f"sh_degree must be 0-3, got {sh_degree}")
    standard = read_ply(
        write_ply(
            gaussians.contiguous(),
            image_width=image_width,
            image_height=image_height,
            focal_length_px=focal_length_px,
            layout="standard",
        )
    ).vertices
    names = vertex_names(sh_degree)
    rows = np.zeros(len(standard), [(name, "<f4") for name in names])
    for name in standard.dtype.names:
        rows[name] = standard[name]
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(rows)}\n"
        + "".join(f"property float {name}\n" for name in names)
        + "end_header\n"
    )
    ply = folder / "point_cloud" / f"iteration_{ITERATION}" / "point_cloud.ply"
    ply.parent.mkdir(parents=True, exist_ok=True)
    ply.write_bytes(header.encode("ascii") + rows.tobytes())
    # str(argparse.Namespace) of the original training's arguments, the form it saves.
    (folder / "cfg_args").write_text(
        f"Namespace(data_device='cuda', eval=False, images='images', "
        f"model_path={str(folder)!r}, resolution=-1, sh_degree={sh_degree}, "
        f"source_path={str(folder)!r}, white_background=False)"
    )
    camera = {
        "id": 0,
        "img_name": "input",
        "width": image_width,
        "height": image_height,
        "position": [0.0, 0.0, 0.0],
        "rotation": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        "fx": focal_length_px,
        "fy": focal_length_px,
    }
    (folder / "cameras.json").write_text(json.dumps([camera]))
    return ply
