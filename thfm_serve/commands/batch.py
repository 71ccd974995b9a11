"""`thfm batch INPUT... --out DIR (--url HOST:PORT... | --repo REPO) [--tasks ...] [--ray-address ADDR]`."""

from __future__ import annotations

import argparse
import logging

from ..errors import ThfmError

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("batch", help="run a corpus of videos through a Triton fleet on a Ray cluster",
                       description="Videos from files, directories, globs or manifest files (local paths or "
                       "fsspec URLs) -> <out>/<video id>/<task>.npz and <out>/manifest.jsonl. Re-running "
                       "skips finished videos.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video file, directory, glob or manifest (.txt/.lst/.jsonl/.csv); local or fsspec URL")
    p.add_argument("--out", required=True, help="output directory (one folder per video, manifest.jsonl)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", action="append",
                     help="Triton gRPC endpoint HOST:PORT (repeat; a DNS name with several addresses, such "
                     "as a Kubernetes headless Service, is expanded into every server behind it)")
    src.add_argument("--repo", help="model repository to serve: the job starts one tritonserver per Ray node "
                     "(the path must be readable on every node)")
    p.add_argument("--tasks", default="all", help="comma-separated task names or 'all'")
    p.add_argument("--ray-address", default=None,
                   help="existing Ray cluster (HOST:PORT, ray://..., 'auto'); default: RAY_ADDRESS if set, "
                   "else a local cluster ('local' forces one)")
    p.add_argument("--pictures", action=argparse.BooleanOptionalAction, default=False,
                   help="also write pictures per video, as thfm predict --pictures")
    p.add_argument("--retries", type=int, default=2,
                   help="extra tries of a failed video (server or network errors; a corrupt video fails at once)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per video task (default 1)")
    p.add_argument("--servers-per-node", type=int, default=1, help="with --repo: tritonservers per Ray node")
    p.add_argument("--server-cpus", type=float, default=0.0,
                   help="with --repo: Ray CPUs reserved per tritonserver (default 0)")
    p.add_argument("--object-store-mb", type=int, default=None, help="object store of a local Ray cluster")
    p.add_argument("--timeout", type=float, default=None, help="seconds per request (default 600)")
    p.add_argument("--max-in-flight", type=int, default=None, help="requests at once per video")
    p.add_argument("--window-retries", type=int, default=None,
                   help="extra tries per window on another server, inside a video (default 3)")
    p.add_argument("--max-frames", type=int, default=None, help="fail videos longer than this")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import parse_tasks

    tasks = parse_tasks(args.tasks)
    if args.servers_per_node < 1:
        raise ThfmError(f"--servers-per-node must be at least 1, got {args.servers_per_node}")
    if args.url:
        from thfm_serve.client.transport import normalize_url

        for u in args.url:
            normalize_url(u)  # HOST:PORT checked before Ray starts
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ThfmError("thfm batch needs Ray: pip install 'thfm-serve[scale]' (scripts/setup.sh installs it)") \
            from None
    from ..scale.ray_batch import run_batch

    options = {k: v for k, v in (("timeout_s", args.timeout), ("max_in_flight", args.max_in_flight),
                                 ("window_retries", args.window_retries), ("max_frames", args.max_frames))
               if v is not None}
    result = run_batch(args.inputs, args.out, tasks, urls=args.url, repo=args.repo, ray_address=args.ray_address,
                       pictures=args.pictures, retries=args.retries, num_cpus=args.num_cpus,
                       servers_per_node=args.servers_per_node, server_cpus=args.server_cpus,
                       object_store_mb=args.object_store_mb, job_options=options)
    # Exit status 1 when some video failed: the manifest says which and why.
    return 0 if result["failed"] == 0 else 1
