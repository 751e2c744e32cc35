"""How `python -m handler` starts: the local API off RunPod, the one-job test, the queue on RunPod.

The image sets SHARP_LOCAL_API=1 and starts `python3 -u -m handler`; these run that command
with the real RunPod SDK and the tiny model on the CPU.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from handler_support import REPO, free_port, http_get, post_json

from engine.settings import DEFAULT_MAX_INLINE_BYTES, LOCAL_API_MAX_INLINE_BYTES, WorkerSettings
from handler.__main__ import sdk_arguments

TEST_JOB = json.loads((REPO / "test_input.json").read_text())["input"]


def worker_env(**env: str) -> dict[str, str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("SHARP_", "BUCKET_", "RUNPOD_"))
    }
    return {**clean, "SHARP_CHECKPOINT": "tiny-untrained", "SHARP_DEVICE": "cpu", **env}


@contextmanager
def started(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "handler", *args], cwd=REPO, env=env, stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def listening_on_all_interfaces(port: int) -> bool:
    """A listening TCP socket bound to 0.0.0.0:port (Linux's table of IPv4 sockets)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return any(row[1] == f"00000000:{port:04X}" and row[3] == "0A" for row in rows)


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"worker exited:\n{log.read_text()[-3000:]}"
        try:
            http_get(url, timeout=5)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise TimeoutError(f"{url} not served after {timeout_s} s:\n{log.read_text()[-3000:]}")


def test_sdk_arguments():
    serve = ["--rp_serve_api", "--rp_api_host", "0.0.0.0"]
    assert sdk_arguments(["m"], True) == ["m", *serve]
    assert sdk_arguments(["m", "--rp_api_port", "9"], True) == ["m", "--rp_api_port", "9", *serve]
    host = ["m", "--rp_api_host=127.0.0.1"]
    assert sdk_arguments(host, True) == [*host, "--rp_serve_api"]
    assert sdk_arguments(["m"], False) == ["m"]
    for given in (["m", "--test_input", "{}"], ["m", "--rp_serve_api"]):
        assert sdk_arguments(given, True) == given


def test_local_api_switch_is_off_on_runpod_and_lifts_the_inline_cap_elsewhere():
    local = WorkerSettings.from_env({"SHARP_LOCAL_API": "1"})
    assert local.local_api and local.max_inline_bytes == LOCAL_API_MAX_INLINE_BYTES
    on_runpod = {"SHARP_LOCAL_API": "1", "RUNPOD_WEBHOOK_GET_JOB": "https://x/job-take/$ID"}
    deployed = WorkerSettings.from_env(on_runpod)
    assert not deployed.local_api and deployed.max_inline_bytes == DEFAULT_MAX_INLINE_BYTES
    capped = WorkerSettings.from_env({"SHARP_LOCAL_API": "1", "SHARP_MAX_INLINE_BYTES": "1000"})
    assert capped.local_api and capped.max_inline_bytes == 1000
    assert WorkerSettings.from_env({}).max_inline_bytes == DEFAULT_MAX_INLINE_BYTES


def test_only_the_local_test_server_fetches_private_urls_by_default():
    assert WorkerSettings.from_env({"SHARP_LOCAL_API": "1"}).allow_private_urls
    refused = {"SHARP_LOCAL_API": "1", "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "false"}
    assert not WorkerSettings.from_env(refused).allow_private_urls
    on_runpod = {"SHARP_LOCAL_API": "1", "RUNPOD_WEBHOOK_GET_JOB": "https://x/job-take/$ID"}
    assert not WorkerSettings.from_env(on_runpod).allow_private_urls
    assert not WorkerSettings.from_env({}).allow_private_urls


def test_local_api_off_runpod_serves_on_all_interfaces(tmp_path):
    """The image's start: SHARP_LOCAL_API=1 and no RunPod variables serve /runsync on 0.0.0.0,
    and a full .ply (66 MB, over RunPod's cap) comes back inline, as the README's curl asks."""
    port = free_port()  # the image's port is the SDK's default, 8000; a free one here
    log = tmp_path / "worker.log"
    with started(["--rp_api_port", str(port)], worker_env(SHARP_LOCAL_API="1"), log) as process:
        wait_for(f"http://127.0.0.1:{port}/openapi.json", process, log)
        assert listening_on_all_interfaces(port)
        job = {"image": TEST_JOB["image"]}
        answer = post_json(f"http://127.0.0.1:{port}/runsync", {"input": job}, timeout=600)
    assert answer["status"] == "COMPLETED", str(answer)[:3000]
    output = answer["output"]
    assert output["format"] == "ply" and output["delivery"] == "inline"
    assert len(base64.b64decode(output["ply"])) == output["size_bytes"] > DEFAULT_MAX_INLINE_BYTES


def test_one_job_mode_runs_test_input_and_exits(tmp_path):
    """SHARP_LOCAL_API=0 (or unset): the SDK's local test, test_input.json once, exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", "handler"],
        cwd=REPO,
        env=worker_env(SHARP_LOCAL_API="0"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Local testing complete" in done.stdout + done.stderr


class JobTake(ThreadingHTTPServer):
    """RunPod's job-take endpoint as far as a worker with no work sees it: 204, no job."""

    def __init__(self) -> None:
        self.polls: list[str] = []
        polls = self.polls

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                polls.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True


def test_on_runpod_the_worker_takes_jobs_even_with_the_local_api_switch(tmp_path):
    """RUNPOD_WEBHOOK_GET_JOB set: the SDK's queue worker, whatever SHARP_LOCAL_API says."""
    server = JobTake()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    take = f"http://127.0.0.1:{server.server_address[1]}/job-take/$ID?gpu=test"
    env = worker_env(
        SHARP_LOCAL_API="1", RUNPOD_WEBHOOK_GET_JOB=take, RUNPOD_POD_ID="worker-1",
        RUNPOD_AI_API_KEY="test-key", RUNPOD_WEBHOOK_PING="",
    )  # fmt: skip
    log = tmp_path / "worker.log"
    try:
        with started([], env, log) as process:
            deadline = time.monotonic() + 300
            while not server.polls and time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
    finally:
        server.shutdown()
        server.server_close()
    assert server.polls and server.polls[0].startswith("/job-take/worker-1?"), log.read_text()
    assert "Starting API server" not in log.read_text()
