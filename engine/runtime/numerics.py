"""Process-wide float32 numerics, set once at start-up by the entry point (worker, CLI, build tool).

fp32 means IEEE float32 here: TF32 convolutions and matmuls would miss the golden tolerances.
torch >= 2.9 has the `fp32_precision` API and refuses to mix it with the legacy `allow_tf32`
flags (which Inductor may read), so the new API is used where it exists and the legacy flags
only on older torch. Nothing else in the project touches these settings.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def configure_numerics() -> str:
    """IEEE float32 for CUDA matmuls and cuDNN convolutions; returns what was set."""
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is not None:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
        described = "fp32_precision=ieee (matmul, cudnn conv)"
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        described = "allow_tf32=False (matmul, cudnn)"
    logger.debug("Numerics: %s", described)
    return described
