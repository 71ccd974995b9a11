"""AsyncThfmClient: the asyncio client (tritonclient.grpc.aio).

    from thfm_serve.client import AsyncThfmClient

    async with AsyncThfmClient(["127.0.0.1:8001", "127.0.0.1:9001"]) as client:
        pred = await client.predict("clip.mp4", tasks="all")

Requests are coroutines on one event loop; encoding a window (CPU work in PyAV) runs in a worker
thread so the loop keeps the other requests moving. On failure the requests still in flight are
cancelled (gRPC cancels them on the wire) instead of being waited for.
"""

from __future__ import annotations

import asyncio
import logging
import time

from thfm_serve.contract import protocol
from thfm_serve.errors import ServerError, ThfmError

from . import wire
from .core import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    Prediction,
    Progress,
    Run,
    check_infos,
    default_in_flight,
    load_clip,
    resolve_tasks,
    single_request_limits,
)
from .scheduler import COOLDOWN_START_S, WindowScheduler
from .sync import _final_error
from .transport import AsyncEndpoint, RequestError, normalize_url, server_message_error

logger = logging.getLogger(__name__)


class AsyncThfmClient:
    """Asyncio client; same arguments and results as ThfmClient. Use it from one event loop (gRPC aio
    channels belong to the loop that created them)."""

    def __init__(self, urls, *, model: str = protocol.ENTRY_MODEL, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 max_in_flight: int | None = None, retries: int = DEFAULT_RETRIES,
                 connect_timeout_s: float = 10.0, cooldown_s: float = COOLDOWN_START_S):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ThfmError("no server URL given")
        self.endpoints = {}
        for u in urls:
            ep = AsyncEndpoint(u, model)
            self.endpoints.setdefault(ep.url, ep)
        self.urls = list(self.endpoints)
        self.model = model
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight or default_in_flight(self.urls)
        self.retries = retries
        self.connect_timeout_s = connect_timeout_s
        self.cooldown_s = cooldown_s
        self._info: wire.ServerInfo | None = None
        self._down: dict[str, str] = {}

    async def close(self) -> None:
        for ep in self.endpoints.values():
            await ep.close()

    async def __aenter__(self) -> "AsyncThfmClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def info(self, refresh: bool = False) -> wire.ServerInfo:
        """See ThfmClient.info."""
        if self._info is not None and not refresh:
            return self._info
        answers = await asyncio.gather(*(self.endpoints[u].info(self.connect_timeout_s) for u in self.urls),
                                       return_exceptions=True)
        infos, errors = [], {}
        for u, a in zip(self.urls, answers):
            if isinstance(a, ThfmError):
                errors[u] = str(a)
            elif isinstance(a, BaseException):
                raise a
            else:
                infos.append(a)
        self._down = errors
        if not infos:
            raise ServerError("; ".join(errors.values()))
        for msg in errors.values():
            logger.warning("%s (will retry it later)", msg)
        self._info = check_infos(infos)
        return self._info

    async def infer(self, tasks, *, frames=None, video: bytes | None = None, url: str | None = None):
        """One request as is (no windowing): ({task: array}, joint names or None)."""
        info = await self.info()
        tasks = resolve_tasks(tasks, info)
        payload = wire.Payload(tuple(tasks), video=video, frames=frames)
        ep = self.endpoints[normalize_url(url) if url else self.urls[0]]
        ep.ensure_limits(*single_request_limits(payload, info))
        try:
            return await ep.infer(payload, self.timeout_s)
        except RequestError as e:
            raise server_message_error(str(e)) from None

    async def predict(self, video, tasks="all", *, overlap: int | None = None, send: str = "video",
                      output_size: str = "input",
                      progress=False, max_frames: int | None = None) -> Prediction:
        """See ThfmClient.predict. Decoding the file runs in a worker thread."""
        t0 = time.monotonic()
        info = await self.info()
        tasks = resolve_tasks(tasks, info)
        clip = await asyncio.to_thread(load_clip, video, max_frames, info.max_pixels)
        run = Run(clip, tasks, info, overlap=overlap, send=send, output_size=output_size)
        sched = WindowScheduler(run.keys, self.urls, self.max_in_flight, self.retries,
                                cooldown_start_s=self.cooldown_s)
        for u, msg in self._down.items():
            sched.avoid(u, msg)
        for ep in self.endpoints.values():
            ep.ensure_limits(run.request_bound, run.response_bound)
        logger.info("%d frames %dx%d: %d window(s) of %d frames, overlap %d, %d request(s) over %d server(s)",
                    run.num_frames, run.width, run.height, len(run.plan), info.window_frames, run.overlap,
                    len(run.keys), len(self.urls))
        bar = Progress(progress, len(run.keys))
        try:
            await self._drive(run, sched, bar)
        finally:
            bar.close()
        return Prediction(run.results(), run.num_frames, run.plan, sched.usage(), sched.retried, run.sent_bytes,
                          time.monotonic() - t0, clip.frames, clip.fps)

    async def _request(self, run: Run, url: str, key):
        payload = await asyncio.to_thread(run.payload, key)
        ep = self.endpoints[url]
        ep.ensure_limits(payload.nbytes, run.response_bound)
        return await ep.infer(payload, self.timeout_s)

    async def _drive(self, run: Run, sched: WindowScheduler, bar: Progress) -> None:
        running: dict[asyncio.Task, object] = {}
        try:
            while not sched.finished:
                pause = None
                while True:
                    a = sched.next()
                    if a is None:
                        break
                    if isinstance(a, float):
                        pause = a
                        break
                    if a.attempt > 1:
                        logger.warning("retrying %s on %s (attempt %d)", run.describe(a.key), a.url, a.attempt)
                    running[asyncio.ensure_future(self._request(run, a.url, a.key))] = a
                if not running:
                    await asyncio.sleep(min(pause or 0.05, 1.0))  # every server is cooling down
                    continue
                done, _ = await asyncio.wait(list(running), timeout=pause, return_when=asyncio.FIRST_COMPLETED)
                # Deterministic handling order (asyncio.wait returns a set).
                for task in sorted(done, key=lambda t: running[t].key):
                    a = running.pop(task)
                    try:
                        outputs, names = task.result()
                    except RequestError as e:
                        why = sched.failed(a.key, str(e), e.retriable)
                        if why is not None:
                            raise _final_error(run.describe(a.key), why, e) from None
                        logger.warning("%s: %s", run.describe(a.key), e)
                        continue
                    except ThfmError:
                        sched.cancel(a.key)
                        raise
                    run.accept(a.key, outputs, names)
                    sched.succeeded(a.key)
                    logger.debug("%s done by %s", run.describe(a.key), a.url)
                    bar.step()
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
