"""Checkpoint loading through the public path: files, downloads, and clear failures."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.io.checkpoint import (
    TINY_UNTRAINED,
    CheckpointError,
    build_untrained,
    download,
    file_digest,
    load_network,
    resolve_checkpoint,
)
from engine.network import UNUSED_CHECKPOINT_PREFIXES
from engine.network.config import SharpConfig


def test_tiny_checkpoint_loads_with_golden_weights(tiny_checkpoint, make_weights, tiny_shapes):
    model, info = load_network(tiny_checkpoint)
    assert info.config == SharpConfig.tiny()
    assert info.path == tiny_checkpoint and not info.untrained
    expected = make_weights(tiny_shapes)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not any(p.requires_grad for p in model.parameters())


def test_official_shapes_load_without_copying(official_checkpoint, official_shapes):
    # In a fresh process, so the peak resident memory is the loader's alone.
    # VmHWM, not ru_maxrss: the latter carries the parent's peak across fork and exec.
    script = (
        "import re, sys; from engine.io.checkpoint import load_network; "
        "model, info = load_network(sys.argv[1]); "
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
        "print(sum(p.numel() for p in model.parameters()), int(hwm) * 1024)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(official_checkpoint)],
        capture_output=True,
        text=True,
        check=True,
    )
    num_values, peak_rss = map(int, result.stdout.split())
    used = [k for k in official_shapes if not k.startswith(UNUSED_CHECKPOINT_PREFIXES)]
    assert num_values == sum(torch.Size(official_shapes[k]).numel() for k in used)
    # The file holds 2.8 GB; memory-mapping + assign must not read it all into RAM.
    assert peak_rss < official_checkpoint.stat().st_size / 2, f"peak RSS {peak_rss / 1e9:.2f} GB"


def save_modified(source: Path, target: Path, change) -> Path:
    state = torch.load(source, weights_only=True)
    change(state)
    torch.save(state, target)
    return target


def test_missing_key_is_named(tiny_checkpoint, tmp_path):
    key = "feature_model.fusion.out_conv.bias"
    path = save_modified(tiny_checkpoint, tmp_path / "m.pt", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing \(1\): {key}"):
        load_network(path)


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    key = "prediction_head.texture_prediction_head.bias"

    def change(state):
        state[key] = torch.zeros(23)

    path = save_modified(tiny_checkpoint, tmp_path / "s.pt", change)
    with pytest.raises(CheckpointError, match=rf"{key}: checkpoint \(23,\) vs network \(22,\)"):
        load_network(path)


def test_unexpected_key_is_named(tiny_checkpoint, tmp_path):
    def change(state):
        state["feature_model.extra.weight"] = torch.zeros(1)

    path = save_modified(tiny_checkpoint, tmp_path / "u.pt", change)
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): feature_model.extra.weight"):
        load_network(path)


def test_unused_keys_may_be_absent(tiny_checkpoint, tmp_path):
    removed = []

    def change(state):
        for key in [k for k in state if k.startswith(UNUSED_CHECKPOINT_PREFIXES)]:
            removed.append(key)
            del state[key]

    network, _ = load_network(save_modified(tiny_checkpoint, tmp_path / "lean.pt", change))
    assert removed  # the tiny checkpoint has them: the lean one really lacks keys
    # Every weight the network reads is the checkpoint's, bit for bit.
    expected = torch.load(tiny_checkpoint, weights_only=True)
    for key, value in network.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_truncated_file_says_so(tiny_checkpoint, tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(tiny_checkpoint.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated, damaged or not a PyTorch state dict"):
        load_network(path)


def test_not_a_sharp_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a SHARP checkpoint"):
        load_network(path)


def test_missing_file_lists_the_accepted_forms(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*http\\(s\\) URL.*tiny-untrained"):
        load_network(tmp_path / "nope.pt")


def test_tiny_untrained_is_deterministic_and_labelled():
    model, info = load_network(TINY_UNTRAINED)
    assert info.untrained and info.path is None and info.config == SharpConfig.tiny()
    again = build_untrained()
    for (key, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key


def test_file_digest_is_cached_and_tracks_changes(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"a" * 1000)
    first = file_digest(path)
    assert (tmp_path / "blob.bin.sha256").is_file()
    assert file_digest(path) == first
    path.write_bytes(b"b" * 1000)
    assert file_digest(path) != first


class RangeServer(http.server.ThreadingHTTPServer):
    """Serves one payload with Range support; can cut the first response short."""

    def __init__(self, payload: bytes, cut_first_at: int | None = None) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.payload = payload
        self.cut_first_at = cut_first_at
        self.ranges: list[str | None] = []


class RangeHandler(http.server.BaseHTTPRequestHandler):
    server: RangeServer

    def do_GET(self) -> None:
        payload = self.server.payload
        requested = self.headers.get("Range")
        self.server.ranges.append(requested)
        start = int(requested.removeprefix("bytes=").rstrip("-")) if requested else 0
        body = payload[start:]
        self.send_response(206 if requested else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.cut_first_at
        if cut is not None:
            self.server.cut_first_at = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve() -> Iterator:
    servers = []

    def start(payload: bytes, cut_first_at: int | None = None) -> tuple[RangeServer, str]:
        server = RangeServer(payload, cut_first_at)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/models/sharp_tiny.pt"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_resumes_and_renames_atomically(serve, tmp_path, tiny_checkpoint, monkeypatch):
    payload = tiny_checkpoint.read_bytes()
    server, url = serve(payload, cut_first_at=len(payload) // 3)
    target = tmp_path / "cache" / "sharp_tiny.pt"
    with pytest.raises(CheckpointError, match="run again to resume"):
        download(url, target)
    assert not target.exists()
    partial = target.with_name("sharp_tiny.pt.partial")
    assert partial.stat().st_size == len(payload) // 3

    download(url, target)
    assert server.ranges == [None, f"bytes={len(payload) // 3}-"]
    assert target.read_bytes() == payload and not partial.exists()

    # The public path resolves the URL through the cache and loads it.
    monkeypatch.setenv("SHARP_CACHE_DIR", str(tmp_path / "cache"))
    assert resolve_checkpoint(url) == target
    model, info = load_network(url)
    assert info.path == target and info.config == SharpConfig.tiny()
    assert len(server.ranges) == 2  # served from the cache, not downloaded again


def test_download_failure_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="downloading http://127.0.0.1:9/x.pt failed"):
        download("http://127.0.0.1:9/x.pt", tmp_path / "x.pt")


def test_hugging_face_reference(monkeypatch, tmp_path):
    import engine.io.checkpoint as checkpoint

    seen = []
    monkeypatch.setattr(checkpoint, "download", lambda url, target: seen.append((url, target)))
    monkeypatch.setenv("SHARP_CACHE_DIR", str(tmp_path))
    resolve_checkpoint("hf://apple/Sharp")
    assert seen == [
        (
            "https://huggingface.co/apple/Sharp/resolve/main/sharp_2572gikvuh.pt",
            tmp_path / "sharp_2572gikvuh.pt",
        )
    ]
    with pytest.raises(CheckpointError, match="hf://owner/repo"):
        resolve_checkpoint("hf://apple")
