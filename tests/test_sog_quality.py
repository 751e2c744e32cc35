"""The default .sog is visually lossless where users look at it: in a real viewer.

Spark (tests/viewers.py) renders the pipeline's .ply (float32, exact) and the default .sog of
the same prediction (the tiny model on samples/coffee.jpg) from the capture camera; the frames
must agree within sog_precision.VISUALLY_LOSSLESS_PSNR_DB. benchmarks/sog_quality.py measures
every precision level and two novel viewpoints; one view here keeps CI short.
"""

from __future__ import annotations

from pathlib import Path

from engine.io.checkpoint import TINY_UNTRAINED
from engine.io.images import decode_image
from engine.runtime.predictor import SharpPredictor
from engine.splats.formats import encode
from engine.splats.formats.sog_precision import VISUALLY_LOSSLESS_PSNR_DB
from tests import viewers
from tests.render_metrics import psnr, ssim

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "coffee.jpg"


def test_default_sog_renders_as_the_ply(tmp_path):
    viewers.require_spark()
    prediction = SharpPredictor.from_checkpoint(TINY_UNTRAINED, "cpu").predict(
        decode_image(SAMPLE.read_bytes())
    )
    camera = dict(
        image_width=prediction.image_width,
        image_height=prediction.image_height,
        focal_length_px=prediction.focal_length_px,
    )
    frames = {}
    for format in ("ply", "sog"):
        path = tmp_path / f"coffee.{format}"
        path.write_bytes(encode(prediction.gaussians, format, **camera).data)
        frames[format] = viewers.render_in_spark(
            path,
            width=prediction.image_width // 2,
            height=prediction.image_height // 2,
            fovy_deg=viewers.vertical_fov_deg(prediction.focal_length_px, prediction.image_height),
            pose=viewers.CAPTURE_POSE[format],
        )
    assert frames["ply"].max() > 0  # the scene is in view
    assert psnr(frames["sog"], frames["ply"]) > VISUALLY_LOSSLESS_PSNR_DB
    assert ssim(frames["sog"], frames["ply"]) > 0.99
