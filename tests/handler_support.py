"""Real servers for the worker tests: the worker's local API, a local image host, S3 (moto).

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "coffee.jpg"
# Variables the worker reads; a test server starts from none of them set but its own.
_WORKER_ENV_PREFIXES = ("SHARP_", "BUCKET_", "RUNPOD_", "HF_HUB_CACHE", "AWS_")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(width: int = 32, height: int = 24, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def post_json(url: str, payload: Any, timeout: float = 900) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def http_get(url: str, timeout: float = 60) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@dataclass
class WorkerServer:
    """`python -m handler --rp_serve_api` in a subprocess: the SDK's local API server."""

    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def runsync(self, job_input: Any, timeout: float = 900) -> dict[str, Any]:
        return post_json(f"{self.url}/runsync", {"input": job_input}, timeout=timeout)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def worker_server(
    env: dict[str, str], log: Path, ready_timeout_s: float = 600
) -> Iterator[WorkerServer]:
    """Start the worker with the tiny model on the CPU; wait (bounded) until it answers."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(_WORKER_ENV_PREFIXES)}
    full_env.update({"SHARP_CHECKPOINT": "tiny-untrained", "SHARP_DEVICE": "cpu", **env})
    command = [
        sys.executable, "-m", "handler",
        "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port),
    ]  # fmt: skip
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = WorkerServer(process, port, log)
    try:
        _wait_until_ready(server, ready_timeout_s)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_ready(server: WorkerServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            code = server.process.returncode
            raise RuntimeError(f"worker exited with {code}:\n{server.log_tail()}")
        try:
            http_get(f"{server.url}/openapi.json", timeout=5)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise TimeoutError(f"worker not ready after {timeout_s} s:\n{server.log_tail()}")


Route = Callable[[BaseHTTPRequestHandler], None]


class ImageHost:
    """A local HTTP server whose paths misbehave in the ways image URLs do."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.routes: dict[str, Route] = {
            "/coffee.jpg": lambda h: self._send(h, 200, image, "image/jpeg"),
            "/text": lambda h: self._send(h, 200, b"this is not an image", "text/plain"),
            "/missing.jpg": lambda h: self._send(h, 404, b"not found", "text/plain"),
            "/broken.jpg": lambda h: self._send(h, 500, b"oops", "text/plain"),
            "/redirect": lambda h: self._redirect(h, "/coffee.jpg"),
            "/huge-undeclared": self._huge_undeclared,
            "/slow": self._slow,
        }
        handler = self._handler_class()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> ImageHost:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path)
                if route is None:
                    ImageHost._send(self, 404, b"no such path", "text/plain")
                else:
                    route(self)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    @staticmethod
    def _redirect(handler: BaseHTTPRequestHandler, location: str) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    @staticmethod
    def _huge_undeclared(handler: BaseHTTPRequestHandler) -> None:
        """26 MB with no Content-Length: only counting the bytes can stop it."""
        handler.protocol_version = "HTTP/1.0"  # body ends when the connection closes
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.end_headers()
        chunk = b"\xff" * (1 << 20)
        try:
            for _ in range(26):
                handler.wfile.write(chunk)
        except OSError:  # the client hung up at its cap, as it should
            pass
        handler.close_connection = True

    @staticmethod
    def _slow(handler: BaseHTTPRequestHandler) -> None:
        """A byte every 0.2 s for up to 20 s: each read is quick, the download is not."""
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        try:
            for _ in range(100):
                handler.wfile.write(b"\xff")
                handler.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass


@contextmanager
def moto_s3(bucket: str) -> Iterator[dict[str, str]]:
    """moto's S3 server on loopback with one bucket; yields the worker's BUCKET_* variables."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "BUCKET_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "BUCKET_ACCESS_KEY_ID": "test-key",
        "BUCKET_SECRET_ACCESS_KEY": "test-secret",
        "BUCKET_NAME": bucket,
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["BUCKET_ENDPOINT_URL"],
        aws_access_key_id="test-key",
        aws_secret_access_key="test-secret",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    try:
        yield env
    finally:
        server.stop()


class FailingPredictor:
    """Stands in for a predictor on a GPU that fails: this machine has no GPU to fail."""

    def __init__(self, error: Exception, device: str) -> None:
        self.error = error
        self.device = torch.device(device)

    def poll(self) -> bool:
        return False

    def predict(self, image):
        raise self.error
