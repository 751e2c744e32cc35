"""The worker's parts on their own: input parsing, the URL fetcher, delivery.

The fetcher tests resolve names with a resolver they control and connect through a connector
they control, so that "public" addresses lead to a server on 127.0.0.1: no traffic leaves the
loopback interface.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import urllib.request

import pytest
import torch
from handler_support import FailingPredictor, ImageHost, moto_s3, png_bytes
from runpod.serverless.modules.rp_job import run_job

from engine.results import EmptyResultError, OutputOptions, encode_prediction
from engine.runtime.predictor import Prediction
from engine.settings import Settings, WorkerSettings
from engine.splats.formats import EncodedSplat
from engine.splats.gaussians import Gaussians
from handler import model as handler_model
from handler.fetch import FetchError, FetchPolicy, fetch, is_public_address
from handler.inputs import InputError, decode_base64_image, parse_request
from handler.model import checkpoint_spec, find_in_hf_cache, is_device_fault
from handler.outputs import DeliveryError, base64_size, deliver
from handler.storage import ResultBucket, UploadError
from handler.worker import SharpWorker

PUBLIC_IP = "93.184.215.14"  # any global address; the connector below never dials it
POLICY = FetchPolicy(
    max_bytes=1_000_000, connect_timeout_s=2, total_timeout_s=5, allow_private=False
)


# --- inputs -------------------------------------------------------------------------------


def test_parse_request_defaults_and_int_focal_length():
    request = parse_request({"image": "abc", "focal_length_px": 800})
    assert parse_request({"image": "abc", "min_opacity": 0}).output.min_opacity == 0.0
    assert request.focal_length_px == 800.0 and isinstance(request.focal_length_px, float)
    assert request.output == OutputOptions("ply", "standard", 3, None, None)
    assert request.delivery is None


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        ("a string", "input must be a JSON object"),
        ({"image": "abc", "focal_length_px": True}, "focal_length_px"),
        ({"image": "abc", "focal_length_px": float("inf")}, "focal_length_px does not meet"),
        ({"image": "abc", "ply_layout": ["standard"]}, "ply_layout"),
        # rp_validator skips constraints for values of the default's type; ours still apply.
        ({"image": "abc", "ply_layout": "fancy"}, "ply_layout must be one of standard"),
        ({"image": "abc", "output_format": "obj"}, "output_format must be one of ply"),
        ({"image": "abc", "return": "email"}, "return does not meet"),
        ({"image": "abc", "max_gaussians": True}, "max_gaussians must be an integer"),
        ({"image": "abc", "max_gaussians": 0}, "max_gaussians must be an integer >= 1, got 0"),
        ({"image": "abc", "max_gaussians": 1.5}, "max_gaussians should be"),
        ({"image": "abc", "min_opacity": 2}, "min_opacity must be a number from 0 to 1"),
    ],
)
def test_parse_request_refuses(job_input, message):
    with pytest.raises(InputError, match=message):
        parse_request(job_input)


def test_base64_forms():
    data = bytes(range(256)) * 3
    standard = base64.b64encode(data).decode()
    wrapped = "\n".join(standard[i : i + 76] for i in range(0, len(standard), 76))
    assert decode_base64_image(wrapped, 10_000) == data
    assert decode_base64_image(base64.urlsafe_b64encode(data).decode().rstrip("="), 10_000) == data
    assert decode_base64_image(f"data:image/png;base64,{standard}", 10_000) == data
    with pytest.raises(InputError, match="larger than 100 bytes"):
        decode_base64_image(standard, 100)
    with pytest.raises(InputError, match="image is empty"):
        decode_base64_image("data:image/png;base64,", 100)


# --- URL fetching -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_host():
    with ImageHost(png_bytes()) as host:
        host.routes["/to-loopback"] = lambda h: ImageHost._redirect(h, host.url("/coffee.jpg"))
        host.routes["/to-metadata"] = lambda h: ImageHost._redirect(
            h, "http://metadata.test/latest/meta-data/"
        )
        host.routes["/to-public"] = lambda h: ImageHost._redirect(h, "http://cdn.test/coffee.jpg")
        yield host


class FakeNetwork:
    """DNS answers of our choosing; connections to PUBLIC_IP go to the local image host."""

    def __init__(self, host: ImageHost, answers: dict[str, list[str]]) -> None:
        self.host = host
        self.answers = answers
        self.lookups: list[str] = []
        self.dialed: list[tuple[str, int]] = []

    def resolve(self, name: str, port: int) -> list[str]:
        self.lookups.append(name)
        return self.answers.get(name, [name])  # literals resolve to themselves

    def fetch(self, url: str) -> bytes:
        return fetch(url, POLICY, resolve=self.resolve, connect=self.connect)

    def connect(self, address: tuple[str, int], timeout: float) -> socket.socket:
        self.dialed.append(address)
        assert address[0] == PUBLIC_IP, f"dialed a non-public address {address}"
        return socket.create_connection(("127.0.0.1", self.host.port), timeout)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
        "169.254.169.254", "fd00:ec2::254", "fe80::1", "0.0.0.0", "224.0.0.1", "240.0.0.1",
        "::ffff:127.0.0.1", "2002:7f00:1::", "64:ff9b::a9fe:a9fe", "not an address",
    ],
)  # fmt: skip
def test_non_public_addresses(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", [PUBLIC_IP, "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses(address):
    assert is_public_address(address)


def test_public_name_is_fetched_from_the_checked_address(image_host):
    network = FakeNetwork(image_host, {"cdn.test": [PUBLIC_IP]})
    data = network.fetch("http://cdn.test/coffee.jpg")
    assert data == image_host.image
    assert network.lookups == ["cdn.test"] and network.dialed == [(PUBLIC_IP, 80)]


def test_redirect_hops_are_checked(image_host):
    network = FakeNetwork(image_host, {"cdn.test": [PUBLIC_IP]})
    data = network.fetch("http://cdn.test/to-public")
    assert data == image_host.image and network.lookups == ["cdn.test", "cdn.test"]


@pytest.mark.parametrize(
    ("path", "answers", "refused"),
    [
        ("/to-loopback", {}, "127.0.0.1"),
        ("/to-metadata", {"metadata.test": ["169.254.169.254"]}, "169.254.169.254"),
    ],
)
def test_redirect_to_a_private_address_is_refused(image_host, path, answers, refused):
    network = FakeNetwork(image_host, {"cdn.test": [PUBLIC_IP], **answers})
    with pytest.raises(FetchError, match=f"resolves to {refused}, which is not a public"):
        network.fetch(f"http://cdn.test{path}")
    assert network.dialed == [(PUBLIC_IP, 80)]  # the first hop only


def test_a_name_with_any_private_address_is_refused(image_host):
    network = FakeNetwork(image_host, {"mixed.test": [PUBLIC_IP, "10.0.0.7"]})
    with pytest.raises(FetchError, match="10.0.0.7"):
        network.fetch("http://mixed.test/coffee.jpg")
    assert network.dialed == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/", "http://localhost/", "http://[::1]/", "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
        "http://[::ffff:169.254.169.254]/", "http://0x7f000001/",
    ],
)  # fmt: skip
def test_private_urls_are_refused_before_connecting(url):
    def no_connection(address, timeout):
        raise AssertionError(f"connected to {address}")

    with pytest.raises(FetchError, match="not a public internet address"):
        fetch(url, POLICY, connect=no_connection)


def test_allow_private_switch_reaches_loopback(image_host):
    policy = FetchPolicy(1_000_000, 2, 5, allow_private=True)
    assert fetch(image_host.url("/redirect"), policy) == image_host.image


def test_the_cap_is_enforced_while_reading(image_host):
    policy = FetchPolicy(3_000_000, connect_timeout_s=2, total_timeout_s=10, allow_private=True)
    with pytest.raises(FetchError, match="larger than 3,000,000 bytes"):
        fetch(image_host.url("/huge-undeclared"), policy)


def test_the_deadline_covers_the_whole_download(image_host):
    policy = FetchPolicy(1_000_000, connect_timeout_s=2, total_timeout_s=1, allow_private=True)
    with pytest.raises(FetchError, match="longer than 1 s"):
        fetch(image_host.url("/slow"), policy)


def test_too_many_redirects(image_host):
    image_host.routes["/loop"] = lambda h: ImageHost._redirect(h, "/loop")
    policy = FetchPolicy(1_000_000, 2, 5, allow_private=True, max_redirects=2)
    with pytest.raises(FetchError, match="more than 2 times"):
        fetch(image_host.url("/loop"), policy)


def test_connection_refused(image_host):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    policy = FetchPolicy(1_000_000, 2, 5, allow_private=True)
    with pytest.raises(FetchError, match="cannot connect to 127.0.0.1"):
        fetch(f"http://127.0.0.1:{port}/a.jpg", policy)


# --- delivery -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket():
    with moto_s3("units") as env:
        settings = WorkerSettings.from_env(env)
        yield ResultBucket(settings.bucket)


PAYLOAD = EncodedSplat(b"ply\n" + bytes(3000), "ply", "application/octet-stream", ".ply")


def test_inline_when_it_fits():
    result = deliver(PAYLOAD, delivery=None, max_inline_bytes=10_000, bucket=None, job_id="j")
    assert result == {"delivery": "inline", "ply": base64.b64encode(PAYLOAD.data).decode()}
    assert base64_size(len(PAYLOAD.data)) == len(result["ply"])


def test_the_limit_is_on_the_base64_size():
    limit = base64_size(len(PAYLOAD.data))
    assert deliver(PAYLOAD, delivery=None, max_inline_bytes=limit, bucket=None, job_id="j")
    with pytest.raises(DeliveryError, match="BUCKET_ENDPOINT_URL"):
        deliver(PAYLOAD, delivery=None, max_inline_bytes=limit - 1, bucket=None, job_id="j")


def test_too_large_goes_to_the_bucket_by_default(bucket):
    result = deliver(PAYLOAD, delivery=None, max_inline_bytes=100, bucket=bucket, job_id="job/1")
    assert result["delivery"] == "url" and "/units/sharp/job_1/" in result["ply_url"]
    with urllib.request.urlopen(result["ply_url"], timeout=30) as response:
        assert response.read() == PAYLOAD.data


def test_inline_requested_but_too_large_suggests_the_bucket(bucket):
    with pytest.raises(DeliveryError, match="request return='url'"):
        deliver(PAYLOAD, delivery="inline", max_inline_bytes=100, bucket=bucket, job_id="j")


def test_upload_failure_is_an_error_not_a_local_path(bucket):
    broken = ResultBucket(
        WorkerSettings.from_env(
            {
                "BUCKET_ENDPOINT_URL": bucket.settings.endpoint_url,
                "BUCKET_ACCESS_KEY_ID": "a",
                "BUCKET_SECRET_ACCESS_KEY": "b",
                "BUCKET_NAME": "no-such-bucket",
            }
        ).bucket
    )
    with pytest.raises(UploadError, match="no-such-bucket"):
        deliver(PAYLOAD, delivery="url", max_inline_bytes=10_000, bucket=broken, job_id="j")


def synthetic_prediction(n: int = 64) -> Prediction:
    generator = torch.Generator().manual_seed(0)
    gaussians = Gaussians(
        means=torch.rand(n, 3, generator=generator) + torch.tensor([0.0, 0.0, 2.0]),
        scales=torch.rand(n, 3, generator=generator) * 0.01 + 0.001,
        quaternions=torch.nn.functional.normalize(torch.rand(n, 4, generator=generator), dim=-1),
        colors=torch.rand(n, 3, generator=generator),
        opacities=torch.linspace(0.05, 0.95, n),
    )
    return Prediction(gaussians, 40, 30, 50.0, "override")


def test_pruned_encoding_counts_what_it_keeps():
    result = encode_prediction(
        synthetic_prediction(), OutputOptions("splat", "standard", 3, 10, None)
    )
    output = result.splat
    assert output.format == "splat" and result.num_gaussians == 10 and len(output.data) == 10 * 32


def test_pruning_away_everything_is_the_clients_error():
    with pytest.raises(EmptyResultError, match="min_opacity=0.99 leaves no Gaussian"):
        encode_prediction(synthetic_prediction(), OutputOptions("spz", "standard", 3, None, 0.99))


# --- model loading --------------------------------------------------------------------------


def test_hf_reference_is_found_in_runpods_model_cache(tmp_path):
    repo = tmp_path / "models--apple--Sharp"
    old = repo / "snapshots" / "0ld" / "sharp_2572gikvuh.pt"
    pinned = repo / "snapshots" / "abc123" / "sharp_2572gikvuh.pt"
    for path in (old, pinned):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    assert find_in_hf_cache("hf://apple/Sharp", tmp_path) == pinned
    assert find_in_hf_cache("hf://apple/Sharp/other.pt", tmp_path) is None
    env = {"SHARP_CHECKPOINT": "hf://apple/Sharp", "HF_HUB_CACHE": str(tmp_path)}
    assert checkpoint_spec(Settings.from_env(env)) == str(pinned)
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    assert checkpoint_spec(Settings.from_env(env)) == "hf://apple/Sharp"


def test_cpu_errors_are_not_device_faults():
    assert not is_device_fault(RuntimeError("CUDA error: boom"), torch.device("cpu"))
    illegal_access = RuntimeError("CUDA error: an illegal memory access")
    assert is_device_fault(illegal_access, torch.device("cuda"))


def failing_worker(error: Exception, device: str = "cuda") -> SharpWorker:
    return SharpWorker(Settings.from_env({}), FailingPredictor(error, device), None)


def run_sdk_job(worker: SharpWorker) -> dict:
    """The SDK's own job runner, which turns the handler's result into what RunPod receives."""
    job = {"id": "job-1", "input": {"image": base64.b64encode(png_bytes()).decode()}}
    return asyncio.run(run_job(worker, job))


def test_out_of_memory_fails_the_job_and_keeps_a_healthy_worker(monkeypatch):
    monkeypatch.setattr("handler.worker.gpu_healthy", lambda device: True)
    result = run_sdk_job(failing_worker(torch.cuda.OutOfMemoryError("x")))
    assert "ran out of memory" in result["error"] and "stopPod" not in result


def test_out_of_memory_on_an_unhealthy_gpu_refreshes_the_worker():
    # No GPU here, so the health check really fails.
    result = run_sdk_job(failing_worker(torch.cuda.OutOfMemoryError("x")))
    assert "ran out of memory" in result["error"] and result["stopPod"] is True


def test_device_fault_refreshes_the_worker(monkeypatch):
    monkeypatch.setattr("handler.worker.gpu_healthy", lambda device: True)
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    result = run_sdk_job(failing_worker(error))
    assert "the GPU failed" in result["error"] and result["stopPod"] is True


def test_other_failures_are_reported_without_refreshing():
    result = run_sdk_job(failing_worker(ValueError("unexpected"), device="cpu"))
    assert result == {"error": "internal error (ValueError): unexpected"}


def test_select_device_cpu_and_missing_cuda():
    assert handler_model.select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(handler_model.DeviceError, match="SHARP_DEVICE=cuda"):
            handler_model.select_device("cuda")


def test_spz_version_is_validated_and_applied():
    request = parse_request({"image": "aGk=", "output_format": "spz", "spz_version": 4})
    assert request.output.spz_version == 4
    assert parse_request({"image": "aGk="}).output.spz_version == 3
    with pytest.raises(InputError, match="spz_version"):
        parse_request({"image": "aGk=", "spz_version": 1})
    options = OutputOptions("spz", "standard", 4, None, None)
    output = encode_prediction(synthetic_prediction(), options).splat
    assert output.data[:4] == b"NGSP"  # version 4 has a plain header; 2 and 3 are gzip
