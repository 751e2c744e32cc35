"""One request on the GPU at a time, a bounded number waiting, and the rest turned away at once.

The event loop counts requests in and out (no lock: one thread), and a single worker thread
runs the jobs in order of arrival, so the model never sees two at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# A guess for Retry-After before the first job has been timed.
FIRST_JOB_GUESS_S = 5.0


class Admission:
    def __init__(self, max_queued: int) -> None:
        self.capacity = 1 + max_queued  # the one running and those waiting
        self.admitted = 0
        self.job_s = FIRST_JOB_GUESS_S  # a moving average of job times
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job")

    def try_enter(self) -> bool:
        if self.admitted >= self.capacity:
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1

    def retry_after_s(self) -> int:
        """Seconds until the jobs admitted now are likely done."""
        return max(1, math.ceil(self.job_s * self.admitted))

    async def run(self, job: Callable[..., T], *args: object) -> T:
        """Run `job` on the job thread, after those admitted before it."""

        def timed() -> T:
            start = time.perf_counter()
            try:
                return job(*args)
            finally:
                self.job_s = 0.8 * self.job_s + 0.2 * (time.perf_counter() - start)

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)
