"""The network's top-level blocks by name: the units of a precision plan and of its error report.

Pure names, so that configuration can check a block list without importing the runtime.
"""

from __future__ import annotations

PREDICTOR = "monodepth_model.monodepth_predictor"
# The network's top-level blocks, in forward order: the units a precision plan puts in half
# precision or keeps in float32, and the rows of the per-block error report.
BLOCKS = (
    f"{PREDICTOR}.encoder.patch_encoder",
    f"{PREDICTOR}.encoder.image_encoder",
    f"{PREDICTOR}.encoder.upsample_latent0",
    f"{PREDICTOR}.encoder.upsample_latent1",
    f"{PREDICTOR}.encoder.upsample0",
    f"{PREDICTOR}.encoder.upsample1",
    f"{PREDICTOR}.encoder.upsample2",
    f"{PREDICTOR}.encoder.upsample_lowres",
    f"{PREDICTOR}.encoder.fuse_lowres",
    f"{PREDICTOR}.decoder",
    f"{PREDICTOR}.head",
    "feature_model.decoder",
    "feature_model.image_encoder",
    "feature_model.fusion",
    "feature_model.texture_head",
    "feature_model.geometry_head",
    "prediction_head",
)


def resolve_block(name: str) -> str:
    """A block's full name from itself or a unique dotted suffix ("patch_encoder")."""
    matches = [block for block in BLOCKS if block == name or block.endswith("." + name)]
    if len(matches) != 1:
        raise ValueError(f"{name!r} names {len(matches)} blocks; blocks are: {', '.join(BLOCKS)}")
    return matches[0]
