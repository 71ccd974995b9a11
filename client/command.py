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

from thfm_serve.errors import ThfmError

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


def _check_in_process_only(args) -> None:
    if getattr(args, "prompt", None):
        raise ThfmError("--prompt works only in-process (--checkpoint): the served models use the task "
                        "prompts embedded at export")
    if getattr(args, "bf16", False):
        raise ThfmError("--bf16 is for the in-process path; the served precision is chosen at export "
                        "(thfm export --precision)")


def _check_geometry(args, info) -> None:
    """--height/--width/--window are fixed by the export on the server side; accept them only when they
    agree, so that nobody believes they changed something."""
    for flag, want, have in (("--height", getattr(args, "height", None), info.height),
                             ("--width", getattr(args, "width", None), info.width),
                             ("--window", getattr(args, "window", None), info.window_frames)):
        if want is not None and want != have:
            raise ThfmError(f"{flag} {want} differs from the served model's {have} (fixed when the model "
                            "repository was exported)")


def run_remote(args, tasks: list[str]) -> int:
    from thfm_serve.video import probe_video

    from .aio import AsyncThfmClient
    from .core import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S

    _check_in_process_only(args)
    # Probe first: a missing or unreadable file is reported before any server is contacted.
    probe_video(args.video)
    quiet = bool(getattr(args, "quiet", False))
    overlap = getattr(args, "overlap", None)
    send = getattr(args, "send", None) or "video"
    timeout = getattr(args, "timeout", None) or DEFAULT_TIMEOUT_S
    retries = getattr(args, "retries", None)
    retries = DEFAULT_RETRIES if retries is None else retries
    if retries < 0:
        raise ThfmError(f"--retries must be >= 0, got {retries}")
    in_flight = getattr(args, "max_in_flight", None)
    if in_flight is not None and in_flight < 1:
        raise ThfmError(f"--max-in-flight must be at least 1, got {in_flight}")

    async def go():
        async with AsyncThfmClient(args.url, timeout_s=timeout, max_in_flight=in_flight, retries=retries) as client:
            info = await client.info()
            _check_geometry(args, info)
            return await client.predict(args.video, tasks, overlap=overlap, send=send, progress=not quiet,
                                        output_size=getattr(args, "output_size", None) or "input",
                                        max_frames=getattr(args, "max_frames", None))

    pred = asyncio.run(go())
    for path in write_npz(pred.results, args.out):
        logger.info("wrote %s", path)
    if getattr(args, "pictures", False):
        from thfm_serve.visualize import write_pictures

        pics = write_pictures(pred.results, Path(args.out) / "pictures", pred.frames, pred.fps)
        logger.info("wrote %d pictures to %s", len(pics), Path(args.out) / "pictures")
    servers = ", ".join(f"{u}: {n}" for u, n in pred.requests_per_server.items())
    logger.info(
        "%d frames in %d window(s) in %.1f s (requests answered: %s; retried %d; sent %s)",
        pred.num_frames, len(pred.windows), pred.seconds, servers, pred.retries, _size(pred.sent_bytes),
    )
    logger.info("outputs in %s", Path(args.out).resolve())
    return 0
