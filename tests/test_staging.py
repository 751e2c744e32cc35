"""Input staging: the plain preprocessing's numbers, a bounded persistent footprint, no regrowth.

The chunked path that CUDA uses (bytes through the host and device byte buffers) runs here on
the CPU with `through_buffers=True`; only pinning itself needs a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.runtime.staging import DEFAULT_PERSISTENT_PIXELS, InputStaging

CPU = torch.device("cpu")
RESOLUTION = 64
CAP_PIXELS = 1000  # small, so that over-cap images are cheap; 3000 values per chunk
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def plain(rgb: np.ndarray, resolution: int, device: torch.device = CPU) -> torch.Tensor:
    """The allocating form, as SharpPredictor.preprocess writes it."""
    pixels = torch.from_numpy(rgb).to(device)
    pixels = pixels.permute(2, 0, 1)[None].float() / 255.0
    size = (resolution, resolution)
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=True)


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("through_buffers", [False, True])
@pytest.mark.parametrize(
    "shape",
    [
        (20, 30),  # under the cap
        (25, 40),  # exactly the cap: 1000 pixels
        (40, 51),  # over: two chunks of 3000 values and a remainder
        (333, 7),  # over, tall and narrow, many chunks
    ],
)
def test_numbers_equal_the_plain_path(shape, through_buffers):
    staging = InputStaging(
        RESOLUTION, CPU, max_persistent_pixels=CAP_PIXELS, through_buffers=through_buffers
    )
    rgb = image(*shape)
    pixels, factor = staging.stage(rgb, 0.75)
    assert pixels is staging.network_input
    assert torch.equal(pixels, plain(rgb, RESOLUTION))  # bit for bit
    assert factor.tolist() == [0.75]
    assert staging.oversize_stagings == int(rgb.size > 3 * CAP_PIXELS)


@pytest.mark.parametrize("through_buffers", [False, True])
def test_persistent_buffers_never_exceed_the_cap(through_buffers):
    staging = InputStaging(
        RESOLUTION, CPU, max_persistent_pixels=CAP_PIXELS, through_buffers=through_buffers
    )
    cap_values = 3 * CAP_PIXELS
    bound = cap_values * 4 + (2 * cap_values if through_buffers else 0)  # floats + bytes
    for shape in ((10, 10), (100, 100), (7, 9), (400, 300), (25, 40), (30, 30)):
        rgb = image(*shape, seed=shape[0])
        pixels, _ = staging.stage(rgb, 1.0)
        assert torch.equal(pixels, plain(rgb, RESOLUTION))
        assert staging.capacity <= staging.max_capacity == cap_values
        assert staging.persistent_bytes <= bound
    assert staging.capacity == cap_values  # an over-cap image fills the cap, no more
    assert staging.persistent_bytes == bound
    assert staging.oversize_stagings == 2


@pytest.mark.parametrize("through_buffers", [False, True])
def test_steady_state_reuses_the_same_buffers(through_buffers):
    staging = InputStaging(
        RESOLUTION, CPU, max_persistent_pixels=CAP_PIXELS, through_buffers=through_buffers
    )
    staging.stage(image(20, 40), 1.0)  # 2400 values: grows once, to 4096 clamped to 3000
    buffers = (staging._host_bytes, staging._device_bytes, staging._device_floats)
    pointers = [buffer.data_ptr() for buffer in buffers]
    capacity = staging.capacity
    assert capacity == 3 * CAP_PIXELS
    for index, shape in enumerate(((20, 40), (3, 5), (25, 40), (60, 60), (40, 25), (90, 90))):
        rgb = image(*shape, seed=index)
        pixels, _ = staging.stage(rgb, 1.0)
        assert torch.equal(pixels, plain(rgb, RESOLUTION))
        now = (staging._host_bytes, staging._device_bytes, staging._device_floats)
        assert [buffer.data_ptr() for buffer in now] == pointers  # nothing reallocated
        assert staging.capacity == capacity


def test_growth_below_the_cap_is_by_powers_of_two():
    staging = InputStaging(RESOLUTION, CPU, max_persistent_pixels=100_000)
    capacities = []
    for shape in ((10, 10), (100, 100), (90, 90), (150, 200), (300, 300)):
        staging.stage(image(*shape), 1.0)
        capacities.append(staging.capacity)
    assert capacities == [512, 2**15, 2**15, 2**17, 300_000]


def test_the_default_cap_is_a_12_megapixel_photo():
    staging = InputStaging(RESOLUTION, CPU)
    assert staging.max_capacity == 3 * DEFAULT_PERSISTENT_PIXELS == 3 * 4032 * 3024
    rgb = image(3024 + 8, 4032)  # just over the cap
    pixels, _ = staging.stage(rgb, 1.0)
    assert torch.equal(pixels, plain(rgb, RESOLUTION))
    assert staging.capacity == staging.max_capacity and staging.oversize_stagings == 1
    assert staging.persistent_bytes == 4 * 3 * DEFAULT_PERSISTENT_PIXELS  # floats only on CPU


def test_rejects_what_is_not_an_rgb_image():
    staging = InputStaging(RESOLUTION, CPU)
    with pytest.raises(ValueError):
        staging.stage(np.zeros((4, 4, 4), np.uint8), 1.0)
    with pytest.raises(ValueError):
        staging.stage(np.zeros((4, 4, 3), np.float32), 1.0)
    with pytest.raises(ValueError):
        InputStaging(RESOLUTION, CPU, max_persistent_pixels=0)


@needs_cuda
@pytest.mark.parametrize("shape", [(20, 30), (40, 51), (333, 7)])
def test_cuda_pinned_chunks_match_the_plain_path(shape):
    device = torch.device("cuda")
    staging = InputStaging(RESOLUTION, device, max_persistent_pixels=CAP_PIXELS)
    assert staging.pinned and staging._host_factor.is_pinned()
    stream = torch.cuda.Stream()
    rgb = image(*shape)
    with torch.cuda.stream(stream):
        for _ in range(3):  # the pinned buffers are rewritten only after their copies ran
            pixels, factor = staging.stage(rgb, 0.5)
        stream.synchronize()
    assert staging._host_bytes.is_pinned() and staging.capacity <= 3 * CAP_PIXELS
    torch.testing.assert_close(pixels, plain(rgb, RESOLUTION, device), rtol=0, atol=1e-6)
    assert factor.item() == 0.5


@needs_cuda
def test_cuda_over_cap_image_returns_its_memory_to_the_caching_allocator():
    device = torch.device("cuda")
    staging = InputStaging(1536, device, max_persistent_pixels=1_000_000)
    staging.stage(image(1000, 1000), 1.0)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated(device)
    staging.stage(image(3000, 4000), 1.0)  # 12 MP: 144 MB of floats for this call only
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(device) == held
    assert staging.persistent_bytes == 3_000_000 * (1 + 1 + 4)
