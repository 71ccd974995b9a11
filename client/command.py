"""`thfm predict VIDEO --url HOST:PORT [--url ...] --tasks LIST --out DIR`: the same output files as the
in-process `--checkpoint` form (`<task>.npz`, and pictures with --pictures), computed by Triton servers.

Called by thfm_serve.commands.predict once the task list is parsed. Errors a user can cause (a missing
or unreadable video, an unreachable server, an unknown task) are ThfmError: the CLI prints one line
and exits with status 2.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np

from thfm_serve.options import PredictOptions

logger = logging.getLogger(__name__)


def write_npz(results: dict[str, dict[str, np.ndarray]], out_dir: str | Path) -> list[Path]:
    """One `<task>.npz` per task, exactly as thfm_serve.pipeline.write_results writes them (kept here so
    that the client does not import the model code)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, arrays in results.items():
        path = out / f"{task}.npz"
        np.savez(path, **arrays)
        paths.append(path)
    return paths


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def run_remote(opts: "PredictOptions", tasks: list[str]) -> int:
    from thfm_serve.video import probe_video

    from .aio import AsyncThfmClient
    from .core import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S
    from .resolve import expand_urls

    opts.validate()
    # Probe first: a missing or unreadable file is reported before any server is contacted.
    probe_video(opts.video)
    timeout = opts.timeout or DEFAULT_TIMEOUT_S
    retries = DEFAULT_RETRIES if opts.retries is None else opts.retries

    async def go():
        # A DNS name with several addresses (a headless Service) becomes one endpoint per server.
        async with AsyncThfmClient(expand_urls(opts.url), timeout_s=timeout, max_in_flight=opts.max_in_flight,
                                   retries=retries) as client:
            info = await client.info()
            opts.check_served_grid(info.window_frames, info.height, info.width)
            return await client.predict(opts.video, tasks, overlap=opts.overlap, send=opts.send,
                                        progress=not opts.quiet, output_size=opts.output_size,
                                        max_frames=opts.max_frames)

    pred = asyncio.run(go())
    for path in write_npz(pred.results, opts.out):
        logger.info("wrote %s", path)
    if opts.pictures:
        from thfm_serve.visualize import write_pictures

        pics = write_pictures(pred.results, Path(opts.out) / "pictures", pred.frames, pred.fps)
        logger.info("wrote %d pictures to %s", len(pics), Path(opts.out) / "pictures")
    servers = ", ".join(f"{u}: {n}" for u, n in pred.requests_per_server.items())
    logger.info(
        "%d frames in %d window(s) in %.1f s (requests answered: %s; retried %d; sent %s)",
        pred.num_frames, len(pred.windows), pred.seconds, servers, pred.retries, _size(pred.sent_bytes),
    )
    logger.info("outputs in %s", Path(opts.out).resolve())
    return 0
