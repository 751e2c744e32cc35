"""The acceptance targets, and the report: gpu_check.json and the gpu_check.md table."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.gpu_harness.builders import COMPILING
from benchmarks.gpu_harness.run import REFERENCE
from engine.runtime.files import write_atomic

FORWARD_MS_TARGET = 60.0
SPEEDUP_TARGET = 3.0
REQUEST_SOG_MS_TARGET = 150.0
HALF_TOLERANCE_FACTOR = 10  # tolerances_for(half) = 10x golden


def ok(row: dict) -> bool:
    return row.get("status") == "ok"


def passed(row: dict) -> bool:
    return ok(row) and row["validation"]["passed"] and row.get("golden", {"passed": True})["passed"]


def evaluate_targets(rows: Sequence[dict], golden: bool) -> list[dict[str, Any]]:
    """The acceptance targets, each with its value, the backend it came from and met (None
    when nothing measured it)."""
    by_name = {r["backend"]: r for r in rows}
    reference = by_name.get(REFERENCE, {})
    eager_ms = reference.get("forward_ms") if ok(reference) else None
    ran = [
        r for r in rows if r["kind"] in COMPILING and not r["backend"].endswith("fp32") and ok(r)
    ]
    best = min((r for r in ran if passed(r)), key=lambda r: r["forward_ms"], default=None)
    targets = []
    forward = {"target": f"compiled half-precision forward <= {FORWARD_MS_TARGET:g} ms"}
    speedup = {"target": f"compiled half-precision forward >= {SPEEDUP_TARGET:g}x eager fp32"}
    if best is None:
        why = "no compiled half-precision backend " + ("passed validation" if ran else "ran")
        forward.update(value=None, backend=None, met=False if ran else None, note=why)
        speedup.update(value=None, backend=None, met=False if ran else None, note=why)
    else:
        forward.update(
            value=best["forward_ms"],
            backend=best["backend"],
            met=best["forward_ms"] <= FORWARD_MS_TARGET,
        )
        ratio = eager_ms / best["forward_ms"] if eager_ms and best["forward_ms"] else None
        speedup.update(
            value=round(ratio, 2) if ratio else None,
            backend=best["backend"],
            met=None if ratio is None else ratio >= SPEEDUP_TARGET,
        )
    targets += [forward, speedup]

    requests = [r for r in rows if passed(r) and (r.get("request") or {}).get("sog_ms") is not None]
    fastest = min(requests, key=lambda r: r["request"]["sog_ms"], default=None)
    request = {
        "target": f"whole request, image bytes -> .sog bytes <= {REQUEST_SOG_MS_TARGET:g} ms (warm)"
    }
    if fastest is None:
        note = (
            next(
                (r["request"].get("sog_unavailable") for r in rows if ok(r) and r.get("request")),
                None,
            )
            or "no backend that passed validation measured it"
        )
        request.update(value=None, backend=None, met=None, note=note)
    else:
        value = fastest["request"]["sog_ms"]
        request.update(value=value, backend=fastest["backend"], met=value <= REQUEST_SOG_MS_TARGET)
    targets.append(request)

    half = [r for r in rows if ok(r) and not r["backend"].endswith("fp32")]
    accuracy = {
        "target": f"half-precision outputs within {HALF_TOLERANCE_FACTOR}x golden tolerances"
        + ("" if golden else " (vs eager fp32; no --golden)")
    }
    failing = [r["backend"] for r in half if not passed(r)]
    ratios = [
        math.inf if check["ratio"] is None else check["ratio"]
        for r in half
        for check in (r["validation"], r.get("golden"))
        if check
    ]
    worst = max(ratios, default=None)
    accuracy.update(
        value=None if worst is None or worst == math.inf else worst,
        unit="largest error / half-precision tolerance",
        backend=", ".join(failing) or None,
        met=None if not half else not failing,
    )
    targets.append(accuracy)
    return targets


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _verdict(check: dict | None) -> str:
    if not check:
        return "-"
    if check["passed"]:
        return f"pass ({_fmt(check.get('ratio'), 2)})"
    return "FAIL: " + "; ".join(check["exceeded"])


def markdown(report: dict) -> str:
    env = report["environment"]
    versions = env["versions"]
    capability = f", sm {env['capability']}" if env["capability"] else ""
    summary = (
        f"torch {versions['torch']}, CUDA {versions['cuda'] or '-'}, "
        f"cuDNN {versions['cudnn'] or '-'}, TensorRT {versions['tensorrt'] or '-'}; "
        f"config {report['config']} ({report['resolution']} px, "
        f"{report['num_gaussians']:,} Gaussians); {'SMOKE (CPU) ' if report['smoke'] else ''}"
        f"{report['state']} after {report['elapsed_s']:.0f} s"
    )
    lines = [
        f"# gpu_check: {env['device']} ({env['gpu']}{capability})",
        "",
        summary,
        "",
        "| backend | status | build s | forward ms | x eager fp32 | request .sog ms "
        + "| request .ply ms | peak MB | validation (max error / tolerance) | golden |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = next((r for r in report["backends"] if r["backend"] == REFERENCE and ok(r)), None)
    for row in report["backends"]:
        request = row.get("request") or {}
        speedup = (
            reference["forward_ms"] / row["forward_ms"]
            if reference and row.get("forward_ms")
            else None
        )
        status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
        lines.append(
            f"| {row['backend']} | {status.replace('|', '/')} | {_fmt(row.get('build_s'))} "
            f"| {_fmt(row.get('forward_ms'))} | {_fmt(speedup, 2)} | {_fmt(request.get('sog_ms'))} "
            f"| {_fmt(request.get('ply_ms'))} | {_fmt(row.get('peak_mb'))} "
            f"| {_verdict(row.get('validation'))} | {_verdict(row.get('golden'))} |"
        )
    lines += ["", "| target | value | backend | met |", "|---|---|---|---|"]
    for target in report["targets"]:
        met = {True: "yes", False: "NO", None: "not measured"}[target["met"]]
        note = f" ({target['note']})" if target.get("note") else ""
        lines.append(
            f"| {target['target']} | {_fmt(target['value'], 2)} | {target['backend'] or '-'} "
            f"| {met}{note} |"
        )
    notes = sorted(
        {
            f"- .sog not measured: {r['request']['sog_unavailable']}"
            for r in report["backends"]
            if (r.get("request") or {}).get("sog_unavailable")
        }
    )
    if report["smoke"]:
        notes.append("- smoke run: CPU, tiny configuration, few rounds; the targets are for a GPU")
    if report.get("golden_error"):
        notes.append(f"- golden case not used: {report['golden_error']}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_report(out: Path, report: dict, elapsed_s: float) -> None:
    """gpu_check.json and gpu_check.md, each written to a temporary name and renamed."""
    report["elapsed_s"] = round(elapsed_s, 1)
    report["targets"] = evaluate_targets(report["backends"], report["golden"] is not None)
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=2, default=str) + "\n"),
        ("gpu_check.md", markdown(report)),
    ):
        write_atomic(out / name, lambda target, text=text: target.write_text(text))


def print_row(row: dict) -> None:
    parts = [f"{row['backend']}: {row['status']}"]
    if row.get("reason"):
        parts.append(row["reason"])
    if row.get("forward_ms") is not None:
        parts.append(f"forward {row['forward_ms']:.1f} ms")
    if row.get("validation"):
        parts.append(f"validation {_verdict(row['validation'])}")
    parts.append(f"{row.get('seconds', 0):.1f} s")
    print("    " + ", ".join(parts), flush=True)
