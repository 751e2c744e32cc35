"""`sharp-runpod convert --3dgs-model`: the original 3DGS code's model folder, read by plyfile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.splats.formats import encode
from engine.splats.formats.gs_model import ITERATION, vertex_names
from engine.splats.formats.ply import read_ply
from tests.test_sog import tiny_gaussians

CLI = Path(sys.executable).parent / "sharp-runpod"


@pytest.mark.parametrize("sh_degree", [0, 3])
def test_model_folder_rows_are_the_original_struct(tmp_path, sh_degree):
    plyfile = pytest.importorskip("plyfile")
    g = tiny_gaussians(500)
    source = tmp_path / "in.ply"
    camera = dict(image_width=640, image_height=480, focal_length_px=500.0)
    source.write_bytes(encode(g, "ply", **camera, ply_layout="sharp").data)
    folder = tmp_path / "model"
    done = subprocess.run(
        [str(CLI), "convert", str(source), "-o", str(folder), "--3dgs-model",
         "--sh-degree", str(sh_degree)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"sh_degree={sh_degree}," in (folder / "cfg_args").read_text()
    ply = folder / "point_cloud" / f"iteration_{ITERATION}" / "point_cloud.ply"
    vertex = plyfile.PlyData.read(str(ply))["vertex"]
    names = [p.name for p in vertex.properties]
    assert names == vertex_names(sh_degree)
    assert names[3:6] == ["nx", "ny", "nz"]
    assert sum(n.startswith("f_rest_") for n in names) == 3 * (sh_degree + 1) ** 2 - 3
    # SIBR's fixed struct: position, normal, SH, opacity, scale, rotation, all float32
    assert vertex.data.dtype.itemsize == 4 * (3 + 3 + 3 * (sh_degree + 1) ** 2 + 1 + 3 + 4)
    assert {vertex.data.dtype[n].str for n in names} == {"<f4"}
    standard = read_ply(source.read_bytes()).vertices
    for name in standard.dtype.names:
        np.testing.assert_allclose(
            vertex.data[name], standard[name], rtol=1e-4, atol=1e-4
        )  # logit round trip
    for name in ("nx", "ny", "nz", *(n for n in names if n.startswith("f_rest_"))):
        assert not vertex.data[name].any()
    cameras = (folder / "cameras.json").read_text()
    assert '"width": 640' in cameras and '"fx": 500.0' in cameras
