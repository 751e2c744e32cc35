"""Soak run of the worker: many /runsync jobs of varied sizes, and its resident memory after each.

    .venv/bin/python benchmarks/soak.py --jobs 200
    .venv/bin/python benchmarks/soak.py --jobs 6 --max-megapixels 4     # a quick run

Starts `python -m handler --rp_serve_api` (the RunPod SDK's local API server) with the tiny
untrained model on the CPU, sends JPEG and PNG images generated here (0.1 to 24 MP, several
aspect ratios, in a seeded order with the largest size both early and last) as base64 inline
input, and reads VmRSS of the worker process from /proc after every job. It fails when a job
fails, or when the resident memory after the baseline job (20th) grows more than 10 %: by then
the largest image has been seen, so later growth is a leak or fragmentation. Growth is the
median RSS of the last third of the jobs after the baseline against the median of the first
third: between the worker's heap releases (after large images) RSS is a sawtooth of freed but
retained heap, whose peaks say how much glibc kept, not that memory grows; the largest rise
over job 20 is printed beside it.
Prints a summary and writes soak.json (every job's numbers) and worker.log to --out.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from handler_support import WorkerServer, worker_server

# RunPod refuses /runsync bodies over ~20 MB; the worker refuses images over 25 MB.
REQUEST_LIMIT_BYTES = 19_000_000
IMAGE_LIMIT_BYTES = 25_000_000
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 21 / 9, 1 / 2)
BUCKETS = ((0.0, 1.0), (1.0, 4.0), (4.0, 12.0), (12.0, math.inf))  # megapixels
JPEG_QUALITIES = (92, 85, 75, 60)
DEFAULT_BASELINE_JOB = 20
DEFAULT_GROWTH_LIMIT_PCT = 10.0


@dataclass(frozen=True)
class JobSpec:
    index: int  # 1-based, the order sent
    width: int
    height: int
    format: str  # "JPEG" | "PNG"
    seed: int

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def plan_jobs(jobs: int, min_mp: float, max_mp: float, seed: int = 0) -> list[JobSpec]:
    """Log-spaced sizes in a seeded shuffle; the largest also second and last."""
    if jobs < 1 or not 0 < min_mp <= max_mp:
        raise ValueError(f"need jobs >= 1 and 0 < min_mp <= max_mp, got {jobs}, {min_mp}, {max_mp}")
    rng = random.Random(seed)
    steps = max(jobs - 1, 1)
    sizes = [min_mp * (max_mp / min_mp) ** (i / steps) for i in range(jobs)]
    rng.shuffle(sizes)
    for position in {min(1, jobs - 1), jobs - 1}:  # early (before the baseline) and at the end
        sizes[position] = max_mp
    specs = []
    for index, megapixels in enumerate(sizes, start=1):
        aspect = rng.choice(ASPECTS)  # width / height
        width = max(2, round(math.sqrt(megapixels * 1e6 * aspect)))
        height = max(2, round(megapixels * 1e6 / width))
        specs.append(
            JobSpec(index, width, height, rng.choice(("JPEG", "PNG")), rng.randrange(2**31))
        )
    return specs


def synthesize(spec: JobSpec) -> np.ndarray:
    """A smooth random scene; JPEGs get a fine texture too, as photos have."""
    rng = np.random.default_rng(spec.seed)
    coarse = rng.integers(0, 256, (max(2, spec.height // 256), max(2, spec.width // 256), 3))
    image = Image.fromarray(coarse.astype(np.uint8)).resize(
        (spec.width, spec.height), Image.Resampling.BICUBIC
    )
    rgb = np.asarray(image)
    if spec.format == "JPEG":
        tile = rng.integers(-12, 13, (256, 256, 1), dtype=np.int16)
        reps = (-(-spec.height // 256), -(-spec.width // 256), 1)
        rgb = np.clip(rgb + np.tile(tile, reps)[: spec.height, : spec.width], 0, 255)
    return rgb.astype(np.uint8)


def encode_image(spec: JobSpec) -> tuple[bytes, str]:
    """The file and what it is ("PNG", "JPEG q92", ...), small enough for one request."""
    image = Image.fromarray(synthesize(spec))
    budget = min(IMAGE_LIMIT_BYTES, REQUEST_LIMIT_BYTES * 3 // 4)  # base64 is 4/3 larger
    if spec.format == "PNG":
        data = _save(image, "PNG", compress_level=1)
        if len(data) <= budget:
            return data, "PNG"
    for quality in JPEG_QUALITIES:  # a PNG over budget is sent as a JPEG instead
        data = _save(image, "JPEG", quality=quality)
        if len(data) <= budget:
            return data, f"JPEG q{quality}"
    raise ValueError(f"{spec} does not fit a request even as JPEG q{JPEG_QUALITIES[-1]}")


def _save(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of one process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def describe_process(pid: int) -> dict[str, Any]:
    """What is measured: the command line, and any child processes (there should be none)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += (task / "children").read_text().split()
    return {
        "pid": pid,
        "cmdline": [part.decode() for part in cmdline if part],
        "children": children,
    }


def run_soak(
    *,
    jobs: int,
    min_mp: float = 0.1,
    max_mp: float = 24.0,
    out_dir: Path,
    seed: int = 0,
    output_format: str = "spz",
    max_gaussians: int | None = 300_000,
    baseline_job: int = DEFAULT_BASELINE_JOB,
    growth_limit_pct: float = DEFAULT_GROWTH_LIMIT_PCT,
    worker_env: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the soak; the report that soak.json holds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = plan_jobs(jobs, min_mp, max_mp, seed)
    env = {"SHARP_MAX_INLINE_BYTES": "200000000", **(worker_env or {})}
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    with worker_server(env, out_dir / "worker.log") as server:
        process = describe_process(server.process.pid)
        at_start = memory_kib(server.process.pid)
        for spec in specs:
            record = _run_job(server, spec, output_format, max_gaussians)
            records.append(record)
            if progress:
                print(_progress_line(record, jobs), flush=True)
            if not server.alive():
                break
    report = summarize(records, baseline_job, growth_limit_pct)
    report.update(
        wall_s=round(time.perf_counter() - started, 1),
        process=process,
        rss_after_warm_up_kib=at_start["VmRSS"],
        settings={
            "jobs": jobs,
            "min_megapixels": min_mp,
            "max_megapixels": max_mp,
            "seed": seed,
            "output_format": output_format,
            "max_gaussians": max_gaussians,
            "worker_env": env,
            "cpu_count": os.cpu_count(),
        },
        jobs=records,
    )
    (out_dir / "soak.json").write_text(json.dumps(report, indent=1))
    return report


def _run_job(
    server: WorkerServer, spec: JobSpec, output_format: str, max_gaussians: int | None
) -> dict[str, Any]:
    data, sent_as = encode_image(spec)
    job_input: dict[str, Any] = {
        "image": base64.b64encode(data).decode(),
        "output_format": output_format,
    }
    if max_gaussians is not None:
        job_input["max_gaussians"] = max_gaussians
    record: dict[str, Any] = {**asdict(spec), "megapixels": round(spec.megapixels, 3)}
    record.update(sent_as=sent_as, image_bytes=len(data))
    start = time.perf_counter()
    output: dict[str, Any] = {}
    try:
        response = server.runsync(job_input)
        output = response.get("output") or {}
        error = None
        if response.get("status") != "COMPLETED":
            error = response.get("error") or f"status {response.get('status')}"
        elif output.get("status") != "success":
            error = f"unexpected output {sorted(output)}"
    except (OSError, ValueError) as exc:  # lost connection, timeout, not JSON: a failed job
        error = f"{type(exc).__name__}: {exc}"
    record["seconds"] = round(time.perf_counter() - start, 3)
    memory = memory_kib(server.process.pid) if server.alive() else {}
    if not memory:
        error = error or "the worker exited"
    record.update(
        ok=error is None,
        error=error,
        timings_ms=output.get("timings_ms", {}),
        result_bytes=output.get("size_bytes"),
        rss_kib=memory.get("VmRSS"),
        hwm_kib=memory.get("VmHWM"),
    )
    return record


def summarize(
    records: list[dict[str, Any]], baseline_job: int, growth_limit_pct: float
) -> dict[str, Any]:
    """Failures, RSS at the marks, growth after the baseline job, and time by size bucket."""
    rss = [r["rss_kib"] for r in records if r["rss_kib"] is not None]
    # A short run has no 20th job: its middle one stands in.
    baseline = min(baseline_job, max(1, len(rss) // 2)) if rss else 0
    after = rss[baseline:]
    max_rise = (max(after) - rss[baseline - 1]) / rss[baseline - 1] * 100 if after else 0.0
    # Retained-but-free heap makes RSS a sawtooth; a leak shows as a rising median instead.
    third = len(after) // 3
    growth = (
        (statistics.median(after[-third:]) - statistics.median(after[:third]))
        / rss[baseline - 1]
        * 100
        if third
        else 0.0
    )
    failures = [r for r in records if not r["ok"]]
    return {
        "jobs_run": len(records),
        "failures": len(failures),
        "failed_jobs": [{"index": r["index"], "error": r["error"]} for r in failures],
        "baseline_job": baseline,
        "rss_mib": {
            "job_1": _mib(rss[0]) if rss else None,
            f"job_{baseline}": _mib(rss[baseline - 1]) if rss else None,
            "end": _mib(rss[-1]) if rss else None,
            "max": _mib(max(rss)) if rss else None,
            "max_after_baseline": _mib(max(after)) if after else None,
            "peak_hwm": _mib(max(r["hwm_kib"] or 0 for r in records)) if rss else None,
        },
        "max_rise_pct": round(max_rise, 2),  # the sawtooth's highest point over job `baseline`
        "growth_pct": round(growth, 2),  # median of the last third after baseline vs the first
        "growth_limit_pct": growth_limit_pct,
        "passed": not failures and growth <= growth_limit_pct,
        "buckets": _buckets(records),
    }


def _buckets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for low, high in BUCKETS:
        inside = [r for r in records if low <= r["megapixels"] < high and r["ok"]]
        if not inside:
            continue
        seconds = [r["seconds"] for r in inside]
        stages: dict[str, float] = {}
        for stage in ("input", "decode", "inference", "postprocess", "encode"):
            values = [r["timings_ms"].get(stage, 0.0) for r in inside]
            stages[stage] = round(statistics.mean(values), 1)
        label = f"{low:g}-{high:g} MP" if math.isfinite(high) else f">={low:g} MP"
        rows.append(
            {
                "bucket": label,
                "jobs": len(inside),
                "mean_s": round(statistics.mean(seconds), 2),
                "median_s": round(statistics.median(seconds), 2),
                "max_s": round(max(seconds), 2),
                "mean_stage_ms": stages,
            }
        )
    return rows


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def _progress_line(record: dict[str, Any], jobs: int) -> str:
    rss = f"{_mib(record['rss_kib']):8.1f} MiB" if record["rss_kib"] else "       - MiB"
    status = "ok" if record["ok"] else f"FAILED {record['error']}"
    return (
        f"job {record['index']:4d}/{jobs} {record['width']:5d}x{record['height']:<5d} "
        f"{record['megapixels']:6.2f} MP {record['sent_as']:<8} {record['seconds']:7.2f} s "
        f"rss {rss} {status}"
    )


def format_table(report: dict[str, Any]) -> str:
    rss = report["rss_mib"]
    process = report["process"]
    lines = [
        (
            f"jobs {report['jobs_run']}  failures {report['failures']}  "
            f"wall {report.get('wall_s', 0):.0f} s  measured pid {process['pid']} "
            f"({' '.join(process['cmdline'][1:3])}), children {process['children']}"
        ),
        f"RSS (MiB): after warm-up {_mib(report['rss_after_warm_up_kib'])}  "
        + "  ".join(f"{name} {value}" for name, value in rss.items()),
        (
            f"growth after job {report['baseline_job']} (median, last third vs first): "
            f"{report['growth_pct']:+.2f} % (limit {report['growth_limit_pct']:g} %) -> "
            f"{'PASS' if report['passed'] else 'FAIL'}; highest rise over job "
            f"{report['baseline_job']} {report['max_rise_pct']:+.2f} % (retained free heap)"
        ),
        "",
        (
            f"{'bucket':<12} {'jobs':>5} {'mean s':>8} {'median s':>9} {'max s':>7}   "
            "mean ms: decode inference postprocess encode"
        ),
    ]
    for row in report["buckets"]:
        stage = row["mean_stage_ms"]
        lines.append(
            f"{row['bucket']:<12} {row['jobs']:>5} {row['mean_s']:>8.2f} {row['median_s']:>9.2f} "
            f"{row['max_s']:>7.2f}   {stage['decode']:>6.0f} {stage['inference']:>9.0f} "
            f"{stage['postprocess']:>11.0f} {stage['encode']:>6.0f}"
        )
    for failure in report["failed_jobs"]:
        lines.append(f"FAILED job {failure['index']}: {failure['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--min-megapixels", type=float, default=0.1)
    parser.add_argument("--max-megapixels", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "soak")
    parser.add_argument("--output-format", default="spz", choices=("ply", "spz", "splat", "sog"))
    parser.add_argument(
        "--max-gaussians", type=int, default=300_000, help="prune to this many; 0: no pruning"
    )
    parser.add_argument("--baseline-job", type=int, default=DEFAULT_BASELINE_JOB)
    parser.add_argument("--growth-limit", type=float, default=DEFAULT_GROWTH_LIMIT_PCT)
    parser.add_argument(
        "--summarize", type=Path, metavar="SOAK_JSON", help="reprint a soak.json's summary; no run"
    )
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="NAME=VALUE",
        help="an extra variable for the worker, e.g. MALLOC_ARENA_MAX=2 (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.summarize is not None:
        saved = json.loads(args.summarize.read_text())
        saved.update(summarize(saved["jobs"], args.baseline_job, args.growth_limit))
        print(format_table(saved))
        return 0 if saved["passed"] else 1
    worker_env = dict(item.split("=", 1) for item in args.worker_env)
    report = run_soak(
        jobs=args.jobs,
        min_mp=args.min_megapixels,
        max_mp=args.max_megapixels,
        out_dir=args.out,
        seed=args.seed,
        output_format=args.output_format,
        max_gaussians=args.max_gaussians or None,
        baseline_job=args.baseline_job,
        growth_limit_pct=args.growth_limit,
        worker_env=worker_env,
    )
    print()
    print(format_table(report))
    print(f"\nwrote {args.out / 'soak.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
