"""The same image through both ways of serving, side by side in one run: what a client spends
beyond the forward pass, in time and in bytes.

    .venv/bin/python benchmarks/http_vs_queue.py --rounds 3
    .venv/bin/python benchmarks/http_vs_queue.py --format sog --max-gaussians 50000

Starts the queue worker (`python -m handler --rp_serve_api`, the RunPod SDK's local API
server) and the HTTP worker (`SHARP_SERVE=http python -m handler`), both with the tiny
untrained model on the CPU, and sends them the same request in alternating rounds:
  * queue: POST /runsync with the image as base64 in the JSON input; the file comes back as
    base64 in the JSON result, which the client parses and decodes;
  * http: POST /predict with the image's bytes as the body and the options in the query; the
    file comes back as the body.
For each it prints the client's wall time, the worker's forward pass (inference and
postprocess, as the worker timed them), the file's encode, the rest (wall less both: transport,
JSON and base64 on both sides, the image's decode), and the bytes sent and received. The local SDK server has no queue: on
RunPod a queue endpoint adds its own delay on top of these.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from handler_support import SAMPLE, worker_server
from http_support import http_server, request


def queue_round(url: str, image: bytes, options: dict[str, object]) -> dict[str, float]:
    start = time.perf_counter()
    body = json.dumps({"input": {"image": base64.b64encode(image).decode(), **options}}).encode()
    req = urllib.request.Request(
        f"{url}/runsync", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=1800) as response:
        received = response.read()
    output = json.loads(received)["output"]
    data = base64.b64decode(output[output["format"]])
    wall = time.perf_counter() - start
    timings = output["timings_ms"]
    forward_ms = timings["inference"] + timings["postprocess"]
    return _row(wall, forward_ms, timings["encode"], len(body), received, data)


def http_round(url: str, image: bytes, options: dict[str, object]) -> dict[str, float]:
    start = time.perf_counter()
    query = "&".join(f"{name}={value}" for name, value in options.items())
    answer = request(
        f"{url}/predict?{query}", image, {"Content-Type": "image/jpeg"}, method="POST", timeout=1800
    )
    if answer.status != 200:
        raise RuntimeError(f"HTTP {answer.status}: {answer.body[:300]!r}")
    wall = time.perf_counter() - start
    stage = {name: float(answer.headers[f"x-sharp-timings-ms-{name}"]) for name in STAGES}
    forward_ms = stage["inference"] + stage["postprocess"]
    return _row(wall, forward_ms, stage["encode"], len(image), answer.body, answer.body)


STAGES = ("inference", "postprocess", "encode")


def _row(
    wall: float, forward_ms: float, encode_ms: float, sent: int, received: bytes, data: bytes
) -> dict:
    return {
        "wall_s": wall,
        "forward_s": forward_ms / 1000,
        "encode_s": encode_ms / 1000,
        # Transport, base64 and JSON on both sides, decoding the image: the serving's own cost.
        "rest_s": wall - forward_ms / 1000 - encode_ms / 1000,
        "sent_bytes": sent,
        "received_bytes": len(received),
        "file_bytes": len(data),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--format", default="sog")
    parser.add_argument("--max-gaussians", type=int, default=None)
    parser.add_argument("--image", type=Path, default=SAMPLE)
    args = parser.parse_args()
    image = args.image.read_bytes()
    options: dict[str, object] = {"output_format": args.format}
    if args.max_gaussians:
        options["max_gaussians"] = args.max_gaussians
    rows: dict[str, list[dict]] = {"queue": [], "http": []}
    with tempfile.TemporaryDirectory() as logs:
        queue_env = {"SHARP_MAX_INLINE_BYTES": "200000000"}
        with (
            worker_server(queue_env, Path(logs) / "queue.log") as queue,
            http_server({}, Path(logs) / "http.log") as http,
        ):
            for round_index in range(args.rounds):
                rows["queue"].append(queue_round(queue.url, image, options))
                rows["http"].append(http_round(http.url, image, options))
                print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    print(f"\n{args.image.name} ({len(image):,} bytes) -> {options}, {args.rounds} rounds")
    print(json.dumps(rows))  # every round's numbers
    print(
        f"{'mode':<6} {'wall s':>8} {'forward s':>10} {'encode s':>9} {'rest s':>7} "
        f"{'sent':>12} {'received':>12}"
    )
    for mode, runs in rows.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(
            f"{mode:<6} {median['wall_s']:8.2f} {median['forward_s']:10.2f} "
            f"{median['encode_s']:9.2f} {median['rest_s']:7.2f} "
            f"{median['sent_bytes']:12,.0f} {median['received_bytes']:12,.0f}"
        )
    print("(medians of each column; rest = wall less the forward pass and the encode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
