"""The worker's HTTP mode as deployed: `SHARP_SERVE=http python -m handler` in a subprocess.

It listens on 127.0.0.1 with the tiny model on the CPU. Its `/ping` is polled from the moment
the process starts, and what it answered while loading is kept for the tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handler_support import REPO, free_port

_WORKER_ENV_PREFIXES = ("SHARP_", "BUCKET_", "RUNPOD_", "HF_HUB_CACHE", "AWS_", "PORT")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
    timeout: float = 900,
) -> Answer:
    """One HTTP request; an error status is an answer too, not an exception."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Answer(response.status, _lower(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, _lower(error.headers), error.read())


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


@dataclass
class HttpServer:
    process: subprocess.Popen
    port: int
    log: Path
    # (seconds since start, /ping status, body) until the first 200; and /predict while loading
    pings: list[tuple[float, int, bytes]] = field(default_factory=list)
    predict_while_loading: Answer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def predict(self, body: bytes, query: str = "", **headers: str) -> Answer:
        return request(f"{self.url}/predict{query}", body, headers, method="POST")

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def http_server(
    env: dict[str, str], log: Path, ready_timeout_s: float = 900
) -> Iterator[HttpServer]:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(_WORKER_ENV_PREFIXES)}
    full_env.update(
        SHARP_SERVE="http",
        SHARP_HOST="127.0.0.1",
        PORT=str(port),
        SHARP_CHECKPOINT="tiny-untrained",
        SHARP_DEVICE="cpu",
        **env,
    )
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "handler"],
            cwd=REPO,
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = HttpServer(process, port, log)
    try:
        _watch_until_ready(server, ready_timeout_s)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _watch_until_ready(server: HttpServer, timeout_s: float) -> None:
    start = time.monotonic()
    while time.monotonic() < start + timeout_s:
        if not server.alive():
            raise RuntimeError(f"the server exited:\n{server.log_text()[-4000:]}")
        try:
            answer = request(f"{server.url}/ping", timeout=5)
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
            continue
        server.pings.append((time.monotonic() - start, answer.status, answer.body))
        if answer.status == 200:
            return
        if answer.status == 204 and server.predict_while_loading is None:
            server.predict_while_loading = server.predict(b"\xff\xd8", timeout=30)
        time.sleep(0.2)
    raise TimeoutError(f"not ready after {timeout_s} s:\n{server.log_text()[-4000:]}")
