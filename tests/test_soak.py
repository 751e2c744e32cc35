"""The soak benchmark's machinery (benchmarks/soak.py), kept from rotting with a short run.

A handful of jobs through the real worker server; it asserts that every job succeeds and that
memory was measured, not how fast the jobs ran or how the memory moved.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SOAK_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_plan_is_seeded_spread_and_has_the_largest_early_and_last(soak):
    plan = soak.plan_jobs(40, 0.1, 24.0, seed=3)
    assert plan == soak.plan_jobs(40, 0.1, 24.0, seed=3)
    assert plan != soak.plan_jobs(40, 0.1, 24.0, seed=4)
    megapixels = [job.megapixels for job in plan]
    assert all(0.09 < mp < 24.1 for mp in megapixels)
    assert megapixels[1] == pytest.approx(24.0, rel=1e-3)
    assert megapixels[-1] == pytest.approx(24.0, rel=1e-3)
    assert min(megapixels) < 0.2 and {job.format for job in plan} == {"JPEG", "PNG"}
    assert len({round(job.width / job.height, 1) for job in plan}) >= 5  # several aspects


def test_a_24_megapixel_image_fits_one_request(soak):
    job = soak.JobSpec(1, 6532, 3674, "PNG", seed=1)
    data, sent_as = soak.encode_image(job)
    assert len(data) * 4 / 3 <= soak.REQUEST_LIMIT_BYTES and sent_as in ("PNG", "JPEG q92")


def test_short_soak_has_no_failed_job(soak, tmp_path):
    report = soak.run_soak(jobs=6, max_mp=4.0, out_dir=tmp_path, progress=False)
    assert report["failures"] == 0, report["failed_jobs"]
    assert report["jobs_run"] == 6
    assert all(job["rss_kib"] > 0 for job in report["jobs"])
    assert report["process"]["cmdline"][1:3] == ["-m", "handler"]  # the worker, not a wrapper
    assert json.loads((tmp_path / "soak.json").read_text())["failures"] == 0
    assert "failures 0" in soak.format_table(report)


def _records(rss_mib: list[float]) -> list[dict]:
    return [
        {"index": i + 1, "ok": True, "error": None, "megapixels": 1.0, "seconds": 1.0,
         "timings_ms": {}, "rss_kib": int(mib * 1024), "hwm_kib": int(mib * 1024)}
        for i, mib in enumerate(rss_mib)
    ]  # fmt: skip


def test_growth_check_flags_a_leak_and_passes_a_flat_sawtooth(soak):
    sawtooth = [800.0 + (150.0 if i % 7 == 0 else 0.0) - (250.0 if i % 11 == 0 else 0.0)
                for i in range(200)]  # fmt: skip
    flat = soak.summarize(_records(sawtooth), baseline_job=20, growth_limit_pct=10.0)
    assert flat["passed"] and abs(flat["growth_pct"]) < 2 and flat["max_rise_pct"] > 10
    leak = [value + 0.8 * i for i, value in enumerate(sawtooth)]  # 0.8 MiB per job
    leaking = soak.summarize(_records(leak), baseline_job=20, growth_limit_pct=10.0)
    assert not leaking["passed"] and leaking["growth_pct"] > 10
