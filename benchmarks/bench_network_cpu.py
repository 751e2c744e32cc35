"""Full SHARP network forward on the CPU: this project's implementation beside Apple's.

    python -m pytest benchmarks/bench_network_cpu.py --benchmark-enable

Apple's reference runs in the same session when its `sharp` package is importable
(`pip install --no-deps -e <ml-sharp checkout>` plus timm, scipy, plyfile); otherwise only
ours is timed and compared with the ~95 s the reference takes on our 2-core CI machines.
Both networks get random weights: the cost of a forward does not depend on their values.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import SharpConfig
from engine.network import SharpNetwork

ROUNDS = 1  # one forward is ~1.5 minutes on 2 cores


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 1536, 1536, generator=generator), torch.tensor([0.8])


@pytest.mark.benchmark(group="network-forward-cpu-fp32")
def test_ours(benchmark, inputs):
    network = SharpNetwork(SharpConfig()).eval()
    benchmark.extra_info["threads"] = torch.get_num_threads()
    with torch.inference_mode():
        benchmark.pedantic(network, args=inputs, rounds=ROUNDS, iterations=1, warmup_rounds=0)


@pytest.mark.benchmark(group="network-forward-cpu-fp32")
def test_apple_reference(benchmark, inputs):
    models = pytest.importorskip("sharp.models", reason="Apple's sharp package is not installed")
    network = models.create_predictor(models.PredictorParams()).eval()
    benchmark.extra_info["threads"] = torch.get_num_threads()
    with torch.inference_mode():
        benchmark.pedantic(network, args=inputs, rounds=ROUNDS, iterations=1, warmup_rounds=0)
