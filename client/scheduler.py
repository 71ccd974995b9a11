"""Which window goes to which server, and what happens when a request fails.

A pure state machine (no I/O, an injectable clock) shared by the thread-pool driver of ThfmClient
and the asyncio driver of AsyncThfmClient, so both behave the same and the policy is testable
without a server.

Policy:
  * windows are handed out in order, a retried window first (it holds up the frames after it);
  * at most `max_in_flight` requests at once, over all servers;
  * each request goes to the healthy server with the fewest requests in flight (ties: the one that
    was given fewer windows so far, then the order of the URLs), so windows spread over every
    server and a slow server gets fewer of them;
  * a failed request (server gone, timeout, internal error) is retried on another server when one is
    available, at most `retries` times per window; the server that failed is avoided for a cooldown
    that doubles with each consecutive failure (2 s, 4 s, ... up to 60 s) and resets on a success;
  * when every server is cooling down, the scheduler says how long to wait instead of handing out
    work: a single-server run then retries after the cooldown rather than burning its retries;
  * an error the request itself caused (a bad input, an unknown task) is not retried: every server
    would say the same.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

COOLDOWN_START_S = 2.0
COOLDOWN_MAX_S = 60.0


@dataclass
class _Server:
    url: str
    order: int
    in_flight: int = 0
    assigned: int = 0
    succeeded: int = 0
    failures: int = 0  # consecutive
    avoid_until: float = 0.0


@dataclass
class _Job:
    key: object  # the window (or window x task group) this job stands for
    attempts: int = 0
    failed_on: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Assignment:
    key: object
    url: str
    attempt: int  # 1 for the first try


class WindowScheduler:
    def __init__(
        self,
        keys: list,
        urls: list[str],
        max_in_flight: int,
        retries: int = 3,
        clock: Callable[[], float] = time.monotonic,
        cooldown_start_s: float = COOLDOWN_START_S,
        cooldown_max_s: float = COOLDOWN_MAX_S,
    ):
        if not urls:
            raise ValueError("no server URL")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.servers = {u: _Server(u, i) for i, u in enumerate(dict.fromkeys(urls))}
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.clock = clock
        self.cooldown_start_s = cooldown_start_s
        self.cooldown_max_s = cooldown_max_s
        self._pending: deque[_Job] = deque(_Job(k) for k in keys)
        self._running: dict[object, tuple[_Job, str]] = {}
        self._total = len(keys)
        self._done = 0
        self.retried = 0  # requests that were retries (for the summary)

    # -- state

    @property
    def finished(self) -> bool:
        return self._done == self._total

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def usage(self) -> dict[str, int]:
        """Windows each server answered."""
        return {s.url: s.succeeded for s in self.servers.values()}

    def avoid(self, url: str, reason: str = "") -> None:
        """Mark a server unhealthy before any request (e.g. it did not answer the config call)."""
        self._cool(self.servers[url])

    # -- handing out work

    def next(self) -> Assignment | float | None:
        """An assignment; or seconds to wait until a server is usable again; or None when nothing can
        start now (all windows handed out, or max_in_flight reached): wait for a request to end."""
        if not self._pending or self.in_flight >= self.max_in_flight:
            return None
        job = self._pending[0]
        now = self.clock()
        healthy = [s for s in self.servers.values() if s.avoid_until <= now]
        if not healthy:
            return max(0.0, min(s.avoid_until for s in self.servers.values()) - now)
        # Prefer a server this job has not failed on; fall back to any healthy one.
        fresh = [s for s in healthy if s.url not in job.failed_on] or healthy
        server = min(fresh, key=lambda s: (s.in_flight, s.assigned, s.order))
        self._pending.popleft()
        job.attempts += 1
        server.in_flight += 1
        server.assigned += 1
        self._running[job.key] = (job, server.url)
        return Assignment(job.key, server.url, job.attempts)

    # -- results

    def succeeded(self, key) -> None:
        job, url = self._running.pop(key)
        server = self.servers[url]
        server.in_flight -= 1
        server.succeeded += 1
        server.failures = 0
        server.avoid_until = 0.0
        self._done += 1

    def failed(self, key, error: str, retriable: bool) -> str | None:
        """Record a failed request. None: the job is queued again. Otherwise the caller must give up
        (not retriable, or retries exhausted) and the returned text says why (the last errors)."""
        job, url = self._running.pop(key)
        server = self.servers[url]
        server.in_flight -= 1
        job.errors.append(f"{url}: {error}")
        if not retriable:
            return error
        self._cool(server)
        job.failed_on.add(url)
        if job.attempts > self.retries:
            tries = f"{job.attempts} attempt{'s' if job.attempts != 1 else ''}"
            return f"failed after {tries} ({'; '.join(job.errors[-3:])})"
        self.retried += 1
        self._pending.appendleft(job)
        return None

    def cancel(self, key) -> None:
        """A request that was abandoned (the run is failing): free its slot without judging the server."""
        job, url = self._running.pop(key)
        self.servers[url].in_flight -= 1

    def _cool(self, server: _Server) -> None:
        now = self.clock()
        if server.avoid_until > now:
            # Already cooling: the other requests that were in flight when it went down fail at the
            # same moment, and count as one failure, not as a run of them.
            return
        server.failures += 1
        delay = min(self.cooldown_max_s, self.cooldown_start_s * 2 ** (server.failures - 1))
        server.avoid_until = now + delay

