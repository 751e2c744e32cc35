"""The worker's entry point where the RunPod Hub looks for one: `python .runpod/handler.py`.

It starts the same worker as the image's command, `python3 -u -m handler` (handler/__main__.py),
from this repository's root; the image itself does not need this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Ahead of this folder, so that `handler` is the package and not this file.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handler.__main__ import main

if __name__ == "__main__":
    main()
