"""Shared benchmark plumbing: a `timings` fixture that benchmarks fill with their best time
(seconds), and a terminal summary that prints each timing and its speedup over the slowest."""

from __future__ import annotations

import pytest

_TIMINGS = pytest.StashKey[dict[str, float]]()


@pytest.fixture(scope="session")
def timings(request: pytest.FixtureRequest) -> dict[str, float]:
    return request.config.stash.setdefault(_TIMINGS, {})


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    timings = config.stash.get(_TIMINGS, {})
    if len(timings) < 2:
        return
    slowest = max(timings.values())
    terminalreporter.section("speedup (best of rounds)")
    for name, seconds in sorted(timings.items(), key=lambda item: item[1]):
        terminalreporter.write_line(f"{name:<32} {seconds:8.3f} s   {slowest / seconds:6.1f}x")
