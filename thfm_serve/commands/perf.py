"""`thfm perf --url HOST:PORT`: perf_analyzer sweep over a served model (logic in thfm_serve.perf)."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "perf",
        help="measure a served model with perf_analyzer (throughput, p50/p90/p99 per concurrency)",
        description="Runs Triton's perf_analyzer over gRPC once per concurrency level. The entry model "
        "gets a generated clip and task list (--input-data JSON); core/VAE models get input shapes "
        "from the export specs. Writes perf.csv and summary.json into --out.",
    )
    p.add_argument("--url", required=True, help="Triton gRPC endpoint HOST:PORT")
    p.add_argument("--model", default="thfm", help="served model name (default: thfm, the entry model)")
    p.add_argument("--out", default="perf_results", help="output directory (default: perf_results)")
    p.add_argument("--concurrency", default="1", help="levels: list 1,2,4 or range START:END[:STEP] (default 1)")
    p.add_argument("--measurement-ms", type=int, default=5000,
                   help="time window per measurement in ms (default 5000)")
    p.add_argument("--request-count", type=int, default=None,
                   help="measure exactly N requests per level instead of stable time windows "
                   "(for models whose one request takes seconds)")
    p.add_argument("--stability-percentage", type=float, default=10.0,
                   help="windows agree within this %% to count as stable (default 10)")
    p.add_argument("--max-trials", type=int, default=10, help="windows tried per level before giving up (default 10)")
    p.add_argument("--tasks", default="depth,keypoints2d",
                   help="tasks sent to the entry model (default depth,keypoints2d: one dense, one sparse)")
    p.add_argument("--frames", type=int, help="clip frames, 4n+1 (default: the entry model's window)")
    p.add_argument("--height", type=int, help="clip height (default: the entry model's)")
    p.add_argument("--width", type=int, help="clip width (default: the entry model's)")
    p.add_argument("--batch", type=int, default=1, help="rows per request for core/VAE models (default 1)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="limit per perf_analyzer run (default 3600)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import parse_tasks
    from ..perf import PerfOptions, parse_concurrency, run_perf

    opts = PerfOptions(
        url=args.url,
        model=args.model,
        out=Path(args.out),
        concurrency=parse_concurrency(args.concurrency),
        measurement_ms=args.measurement_ms,
        stability_percentage=args.stability_percentage,
        max_trials=args.max_trials,
        request_count=args.request_count,
        tasks=tuple(parse_tasks(args.tasks)),
        frames=args.frames,
        height=args.height,
        width=args.width,
        batch=args.batch,
        timeout_s=args.timeout_s,
    )
    summary = run_perf(opts)
    failed = [r for r in summary["results"] if "error" in r]
    for r in summary["results"]:
        if "error" in r:
            continue
        logger.info(
            "concurrency %d: %.3f infer/s  p50 %.1f ms  p90 %.1f ms  p99 %.1f ms",
            r["concurrency"], r["throughput_infer_per_s"], r["p50_latency_ms"], r["p90_latency_ms"], r["p99_latency_ms"],
        )
    logger.info("results in %s", Path(args.out).resolve())
    if failed:
        logger.error("%d of %d concurrency levels failed (see summary.json)", len(failed), len(summary["results"]))
        return 1
    return 0
