"""The SHARP network in pure PyTorch: no environment, I/O or threads."""

from engine.network.config import SharpConfig, ViTConfig
from engine.network.sharp import UNUSED_CHECKPOINT_PREFIXES, SharpNetwork, SharpOutput, TupleOutputs

__all__ = [
    "UNUSED_CHECKPOINT_PREFIXES",
    "SharpConfig",
    "SharpNetwork",
    "SharpOutput",
    "TupleOutputs",
    "ViTConfig",
]
