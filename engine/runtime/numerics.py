"""Process-wide float32 numerics, set once at start-up by the entry point (worker, CLI, build tool).

fp32 means IEEE float32 here: TF32 convolutions and matmuls would miss the golden tolerances.
torch >= 2.9 has the `fp32_precision` API and refuses a mix with the legacy `allow_tf32` flags
that disagrees (Inductor and torch.export read the legacy ones), so the new API sets every
operator and the one legacy flag without a new-API twin is made to agree. Only the entry
points (worker, CLI, build tool, GPU check) call this; nothing else touches these settings.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def configure_numerics() -> str:
    """IEEE float32 for CUDA matmuls and cuDNN convolutions; returns what was set."""
    if getattr(torch.backends.cuda.matmul, "fp32_precision", None) is None:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return "allow_tf32=False (matmul, cudnn)"
    # cuDNN's global flag has no new-API setter, and readers of the legacy flag (torch.export
    # reads it while tracing) raise when it disagrees with the per-operator settings: it
    # defaults to TF32 on, so it is cleared first (that resets conv/rnn), then each is set.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    logger.debug("Numerics: fp32_precision=ieee (matmul, cudnn conv and rnn)")
    return "fp32_precision=ieee (matmul, cudnn conv and rnn)"
