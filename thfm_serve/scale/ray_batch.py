"""`thfm batch`: a corpus of videos through a Triton fleet, scheduled by Ray Data.

Shape of a run:
1. the driver lists the videos (inputs.list_videos), drops those already finished (their output
   folder exists, see job.py) and checks the fleet once (every server answers, serves the tasks);
2. each remaining video is one row of a Ray Dataset in a block of its own, mapped by a CPU task
   (`num_cpus` per video, default 1) that decodes the clip, cuts it into windows, sends them to the
   servers through the project's gRPC client (which spreads them over every server and retries a
   failed window on another), stitches the answers and commits the video's folder atomically;
3. the driver appends each record to `<out>/manifest.jsonl` as it streams back and finally rewrites
   the manifest with one line per video.

Failures: a video that fails (server errors, a corrupt file) is caught inside its task and comes
back as a `failed` record, after `retries` more tries for errors that may pass; a task lost with its
node is re-run by Ray Data, and a re-run of a video that had already been committed only
reports the committed record. Where the servers come from: `urls` (an existing fleet; a DNS name is
expanded into every address behind it, see client/resolve.py) or `repo`, for which the job starts
one tritonserver per Ray node (an actor pinned to the node, binding the node's IP), stopped at the
end; the repository path must be readable on every node.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from thfm_serve.errors import ServerError, ThfmError

from . import job as jobs
from .inputs import list_videos

logger = logging.getLogger(__name__)

def _process_row(row: dict, job: jobs.VideoJob) -> dict:
    import ray

    rec = jobs.process_video(job, row["video"])
    if not rec.get("skipped"):
        rec["node"] = ray.get_runtime_context().get_node_id()
    # One string column: records differ in their keys (done vs failed), and a fixed schema keeps
    # Ray Data from having to unify Arrow schemas across blocks.
    return {"record": json.dumps(rec)}


def _start_ray(address: str | None, object_store_mb: int | None):
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict = {"logging_level": logging.WARNING, "configure_logging": True}
    if address in (None, "", "local"):
        # A local cluster on this machine (or the one RAY_ADDRESS names, when set and no --ray-address).
        if address == "local":
            os.environ.pop("RAY_ADDRESS", None)
        if object_store_mb:
            kwargs["object_store_memory"] = int(object_store_mb) << 20
        ray.init(**kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


def _check_fleet(urls: list[str], tasks: list[str]) -> list[str]:
    """The servers answer and serve the tasks: checked once before any task is scheduled, so a
    wrong --url fails the command instead of failing every video."""
    from thfm_serve.client import ThfmClient
    from thfm_serve.client.core import resolve_tasks
    from thfm_serve.client.resolve import expand_urls

    expanded = expand_urls(urls)
    with ThfmClient(expanded) as client:
        info = client.info()
        tasks = resolve_tasks(tasks, info)
    logger.info("fleet: %d server(s) serving %s (window %d frames at %dx%d)", len(expanded),
                ",".join(info.tasks), info.window_frames, info.width, info.height)
    return tasks


class NodeServers:
    """One tritonserver per alive Ray node, each started by an actor pinned to that node."""

    def __init__(self, repo: str | Path, per_node: int = 1, cpus: float = 0, start_timeout_s: float = 300):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        repo = Path(repo).resolve()
        actor = ray.remote(num_cpus=cpus, max_restarts=0)(_ServerActor)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.actors = [
            actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(repo), start_timeout_s)
            for n in nodes for _ in range(per_node)
        ]
        try:
            self.urls = ray.get([a.url.remote() for a in self.actors])
        except Exception as e:
            self.stop()
            raise ServerError(f"could not start tritonserver on every node: {e}") from None
        logger.info("started %d tritonserver(s) on %d node(s): %s", len(self.urls), len(nodes), ", ".join(self.urls))

    def stop(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.get(a.stop.remote(), timeout=60)
            except Exception as e:  # noqa: BLE001 - a node may be gone; the others still stop
                logger.warning("stopping a tritonserver: %s", e)
            ray.kill(a)
        self.actors = []


class _ServerActor:
    """A tritonserver on this Ray node, bound to the node's IP on free ports."""

    def __init__(self, repo: str, start_timeout_s: float):
        import ray

        from thfm_serve.server import ServerConfig, TritonServer, server_ports

        host = ray.util.get_node_ip_address()
        log = Path(tempfile.mkdtemp(prefix="thfm-batch-server-")) / "tritonserver.log"
        cfg = ServerConfig(repo=Path(repo), host=host, **server_ports())
        self.server = TritonServer(cfg, log_path=log)
        self.server.start(timeout_s=start_timeout_s)

    def url(self) -> str:
        return self.server.grpc_url

    def stop(self) -> None:
        self.server.stop()

    def __del__(self):  # the actor is killed at the end of the job, or with its driver
        try:
            self.server.stop()
        except Exception:  # noqa: BLE001
            pass


def run_batch(inputs, out: str | Path, tasks: list[str], *, urls: list[str] | None = None,
              repo: str | Path | None = None, ray_address: str | None = None, pictures: bool = False,
              retries: int = 2, num_cpus: float = 1.0, servers_per_node: int = 1, server_cpus: float = 0,
              object_store_mb: int | None = None, job_options: dict | None = None) -> dict:
    """Process every video named by `inputs` into `out`; returns {'done', 'failed', 'total', 'skipped'}."""
    if bool(urls) == bool(repo):
        raise ThfmError("give either --url (a running fleet) or --repo (start servers on the Ray nodes)")
    if retries < 0:
        raise ThfmError(f"--retries must be >= 0, got {retries}")
    if num_cpus <= 0:
        raise ThfmError(f"--num-cpus must be > 0, got {num_cpus}")
    if repo:
        from thfm_serve.repository import check_repository

        check_repository(repo)  # a wrong path fails here, before Ray starts, with what is missing
    out = Path(out).resolve()
    videos = list_videos(inputs)
    todo, done = jobs.plan(out, videos)
    manifest = jobs.Manifest(out)
    for rec in done:
        if manifest.records.get(rec["video"]) != rec:
            manifest.add(rec)
    logger.info("%d video(s): %d already done, %d to run", len(videos), len(done), len(todo))
    started_ray, servers = False, None
    t0 = time.monotonic()
    try:
        if todo:
            if urls:
                tasks = _check_fleet(urls, tasks)  # fails before Ray starts when the fleet is wrong
            import ray

            started_ray = _start_ray(ray_address, object_store_mb)
            if repo:
                servers = NodeServers(repo, servers_per_node, server_cpus)
                urls = servers.urls
                tasks = _check_fleet(urls, tasks)
            job = jobs.VideoJob(out=str(out), urls=list(urls), tasks=list(tasks), pictures=pictures, retries=retries,
                                log_level=logging.getLogger("thfm_serve").getEffectiveLevel())
            if job_options:
                job = replace(job, **job_options)
            ds = ray.data.from_items([{"video": v} for v in todo], override_num_blocks=len(todo))
            # A task lost with its worker or node is re-run by Ray Data (its default for map tasks is
            # to retry system failures without limit); a video's own errors never reach Ray.
            ds = ds.map(_process_row, fn_kwargs={"job": job}, num_cpus=num_cpus)
            for row in ds.iter_rows():
                rec = json.loads(row["record"])
                manifest.add(rec)
                level = logging.INFO if rec["status"] == jobs.DONE else logging.WARNING
                logger.log(level, "%s: %s%s", rec["video"], rec["status"],
                           f" ({rec['error']})" if rec.get("error") else "")
    finally:
        manifest.close(order=videos)
        if servers is not None:
            servers.stop()
        if started_ray:
            import ray

            ray.shutdown()
    lost = [v for v in videos if v not in manifest.records]
    if lost:  # every video comes back from Ray or the run raised: this is a bug if it happens
        raise ThfmError(f"{len(lost)} video(s) have no record: {lost[:5]}")
    result = jobs.summary(manifest.records[v] for v in videos)
    result["skipped"] = len(done)
    logger.info("%d done, %d failed of %d in %.1f s; manifest %s", result["done"], result["failed"],
                result["total"], time.monotonic() - t0, out / jobs.MANIFEST)
    return result
