"""ThfmClient: the blocking client (tritonclient.grpc), windows sent from a thread pool.

    from thfm_serve.client import ThfmClient

    with ThfmClient(["127.0.0.1:8001", "10.0.0.2:8001"]) as client:
        pred = client.predict("clip.mp4", tasks="depth,keypoints2d")
        depth = pred.results["depth"]["depth"]          # [F, H, W] float32
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

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
from .transport import RequestError, SyncEndpoint, normalize_url, server_message_error

logger = logging.getLogger(__name__)


class ThfmClient:
    """Blocking client for one or more Triton servers serving the THFM entry model.

    urls: "HOST:PORT" gRPC endpoints (one string or several); windows of a long clip are spread
    over all of them. timeout_s: per request. max_in_flight: requests at once over all servers
    (default 2 per server). retries: extra tries per window after a server failure. cooldown_s: how
    long a server that failed is avoided at first (doubling per consecutive failure).
    """

    def __init__(self, urls, *, model: str = protocol.ENTRY_MODEL, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 max_in_flight: int | None = None, retries: int = DEFAULT_RETRIES,
                 connect_timeout_s: float = 10.0, cooldown_s: float = COOLDOWN_START_S):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ThfmError("no server URL given")
        self.endpoints = {}
        for u in urls:
            ep = SyncEndpoint(u, model)
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

    # -- lifecycle

    def close(self) -> None:
        for ep in self.endpoints.values():
            ep.close()

    def __enter__(self) -> "ThfmClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- server

    def info(self, refresh: bool = False) -> wire.ServerInfo:
        """The entry model's parameters (window_frames, height, width, limits, tasks), read from every
        server; ServerError when none answers or they serve different models."""
        if self._info is not None and not refresh:
            return self._info
        infos, errors = [], {}
        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futures = {u: pool.submit(self.endpoints[u].info, self.connect_timeout_s) for u in self.urls}
            for u, fut in futures.items():
                try:
                    infos.append(fut.result())
                except ThfmError as e:
                    errors[u] = str(e)
        self._down = errors
        if not infos:
            raise ServerError("; ".join(errors.values()))
        for u, msg in errors.items():
            logger.warning("%s (will retry it later)", msg)
        self._info = check_infos(infos)
        return self._info

    # -- one request

    def infer(self, tasks, *, frames=None, video: bytes | None = None, url: str | None = None):
        """One request as is (no windowing): ({task: array}, joint names or None)."""
        info = self.info()
        tasks = resolve_tasks(tasks, info)
        payload = wire.Payload(tuple(tasks), video=video, frames=frames)
        ep = self.endpoints[normalize_url(url) if url else self.urls[0]]
        ep.ensure_limits(*single_request_limits(payload, info))
        try:
            return ep.infer(payload, self.timeout_s)
        except RequestError as e:
            raise server_message_error(str(e)) from None

    # -- a whole clip

    def predict(self, video, tasks="all", *, overlap: int | None = None, send: str = "video",
                output_size: str = "input",
                progress=False, max_frames: int | None = None) -> Prediction:
        """Run a clip (path, Video or uint8 frames [F, H, W, 3]) through the servers, window by window.

        Returns a Prediction whose .results equal what the in-process path writes (`<task>.npz`).
        """
        t0 = time.monotonic()
        info = self.info()
        tasks = resolve_tasks(tasks, info)
        clip = load_clip(video, max_frames=max_frames, max_pixels=info.max_pixels)
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
            self._drive(run, sched, bar)
        finally:
            bar.close()
        return Prediction(run.results(), run.num_frames, run.plan, sched.usage(), sched.retried, run.sent_bytes,
                          time.monotonic() - t0, clip.frames, clip.fps)

    def _request(self, run: Run, url: str, key):
        payload = run.payload(key)
        ep = self.endpoints[url]
        ep.ensure_limits(payload.nbytes, run.response_bound)
        return ep.infer(payload, self.timeout_s)

    def _drive(self, run: Run, sched: WindowScheduler, bar: Progress) -> None:
        pool = ThreadPoolExecutor(max_workers=sched.max_in_flight, thread_name_prefix="thfm-request")
        running: dict[Future, object] = {}
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
                    running[pool.submit(self._request, run, a.url, a.key)] = a
                if not running:
                    time.sleep(min(pause or 0.05, 1.0))  # every server is cooling down
                    continue
                done, _ = wait(list(running), timeout=pause, return_when=FIRST_COMPLETED)
                for fut in done:
                    a = running.pop(fut)
                    try:
                        outputs, names = fut.result()
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
            for fut in running:
                fut.cancel()
            # Do not wait for requests still on the wire: the run has failed, their answers are moot.
            pool.shutdown(wait=False, cancel_futures=True)


def _final_error(what: str, why: str, err: RequestError) -> ThfmError:
    if not err.retriable:
        return server_message_error(f"{what}: {why}")
    return ServerError(f"{what} {why}")
