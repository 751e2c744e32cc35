"""Full SHARP network forward on the CPU: this project's implementation beside Apple's.

    python -m pytest benchmarks/bench_network_cpu.py --benchmark-enable

Apple's reference runs in the same session when its `sharp` package is importable
(`pip install --no-deps -e <ml-sharp checkout>` plus timm, scipy, plyfile); otherwise only
ours is timed and compared with the ~95 s the reference takes on our 2-core CI machines.
Both networks get the same random weights (`build_untrained`, LayerScale at 1e-5 as in
training): with arbitrary weights activations can grow until softmax underflows into
denormals, which are slow on CPUs and would time the weights rather than the code.
"""

from __future__ import annotations

import pytest
import torch

from engine.io.checkpoint import build_untrained
from engine.network import SharpNetwork
from engine.network.config import SharpConfig

ROUNDS = 1  # one forward is ~1.5 minutes on 2 cores


@pytest.fixture(scope="module")
def network() -> SharpNetwork:
    return build_untrained(SharpConfig())


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 1536, 1536, generator=generator), torch.tensor([0.8])


@pytest.mark.benchmark(group="network-forward-cpu-fp32")
def test_ours(benchmark, network, inputs):
    benchmark.extra_info["threads"] = torch.get_num_threads()
    with torch.inference_mode():
        benchmark.pedantic(network, args=inputs, rounds=ROUNDS, iterations=1, warmup_rounds=0)


@pytest.mark.benchmark(group="network-forward-cpu-fp32")
def test_apple_reference(benchmark, network, inputs):
    models = pytest.importorskip("sharp.models", reason="Apple's sharp package is not installed")
    reference = models.create_predictor(models.PredictorParams()).eval()
    # Ours lacks only the unused heads and depth alignment, which the forward never reads.
    assert not reference.load_state_dict(network.state_dict(), strict=False).unexpected_keys
    network = reference
    benchmark.extra_info["threads"] = torch.get_num_threads()
    with torch.inference_mode():
        benchmark.pedantic(network, args=inputs, rounds=ROUNDS, iterations=1, warmup_rounds=0)
