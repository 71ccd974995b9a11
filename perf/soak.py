"""Soak test: perf_analyzer at a fixed concurrency for minutes against the tiny CPU repository, while
the memory of tritonserver and every python-backend stub is sampled.

    .venv/bin/python perf/soak.py [--duration 300] [--concurrency 8] [--out perf/results/soak]

(scripts/soak.sh runs the set-up first, then this.) Steps:

1. A repository: --repo REPO as given, else the tiny checkpoint (seed 0) exported for cpu/fp32 at a
   5-frame 32x32 grid into --work (reused when it is already there), with max_in_flight at least the
   concurrency so that no request is turned away as busy.
2. tritonserver on free loopback ports (thfm_serve.server.TritonServer).
3. perf_analyzer (thfm_serve.perf: the perf engineer's input-data file, a generated mp4 of one model
   window, plus the task list) on the entry model over gRPC, in time-window mode: three windows of
   duration/3 each. Their stability threshold is set out of reach, because a soak wants a fixed
   length, not a stability search.
4. Every --sample-s seconds: RSS and PSS of tritonserver and of each stub (/proc/<pid>/status and
   smaps_rollup), plus the server's request counters from its metrics endpoint.

Verdict (summary.json "passed"): perf_analyzer succeeded, the server counted no failed request, and
the total RSS shows no steady growth. A least-squares slope is fitted over the second half of the
samples. The first half is warm-up: lazy imports on the first request, allocator arenas and gRPC
buffers growing to their working size. The slope must stay below --max-slope-mib-per-min (default
1 MiB/min). Why that number: with all six tasks on a 5-frame 32x32 window, one request moves about
180 kB (the mp4 in, six outputs back). At the roughly 10-20 requests/s this repository serves on
2 cores, a leak of 1% of one request's tensors (1.8 kB per request) would grow RSS by 1-2 MiB/min.
So 1 MiB/min catches any leak that keeps even a sliver of every request, and stays well above the
sampling noise seen over a flat run (a few hundred kB). The summary also gives the slope per
request ("leak_bytes_per_request"), which does not depend on the machine's speed.

Writes to --out: rss.csv (one row per sample), perf_analyzer.csv (its -f CSV), perf_analyzer.log,
summary.json, rss.png, and README.md, which restates the figures and the command.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from thfm_serve.errors import ThfmError  # noqa: E402

logger = logging.getLogger("soak")

GRID = (5, 32, 32)  # frames, height, width of the exported window: the tests' grid
DEFAULT_THRESHOLD_MIB_PER_MIN = 1.0


# --- the repository and the server ----------------------------------------------------------------

def prepare_repo(work: Path, repo: Path | None, max_in_flight: int) -> Path:
    """--repo as given, or the tiny checkpoint exported into work/repo (reused when up to date)."""
    from thfm_serve.repository import check_repository, current_limits, set_limits

    if repo is None:
        from thfm_serve.checkpoint import init_checkpoint
        from thfm_serve.export import export_repository

        ck = work / "tiny"
        if not (ck / "thfm" / "config.json").is_file():
            init_checkpoint("tiny", ck, seed=0)
        repo = work / "repo"
        t0 = time.perf_counter()
        export_repository(ck, repo, "cpu", "fp32", frames=GRID[0], height=GRID[1], width=GRID[2])
        logger.info("repository %s ready in %.1f s", repo, time.perf_counter() - t0)
    check_repository(repo, "cpu")
    limits = current_limits(repo)
    if limits is None or limits.max_in_flight < max_in_flight:
        # Every request of the closed loop must find room in the entry model's queue.
        set_limits(repo, max_in_flight=max_in_flight)
    return repo


def _kib(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(server) -> dict[str, tuple[int, int]]:
    """Process label -> (RSS, PSS) in bytes, for tritonserver and each python-backend stub alive now."""
    from thfm_serve.server import python_stubs

    labels = {server.pid: "tritonserver", **python_stubs(server.pid)}
    return {name: (_kib(f"/proc/{pid}/status", "VmRSS:") * 1024, _kib(f"/proc/{pid}/smaps_rollup", "Pss:") * 1024)
            for pid, name in labels.items()}


_METRIC = re.compile(r'^(nv_inference_request_(?:success|failure))\{model="([^"]+)",version="[^"]*"\} ([0-9.e+]+)$')


def request_counts(metrics_url: str, model: str) -> tuple[int, int]:
    """(successful, failed) requests of `model` so far, from the server's Prometheus metrics."""
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts = {"nv_inference_request_success": 0, "nv_inference_request_failure": 0}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m and m.group(2) == model:
            counts[m.group(1)] += int(float(m.group(3)))
    return counts["nv_inference_request_success"], counts["nv_inference_request_failure"]


@dataclass
class Sample:
    t: float
    mem: dict[str, tuple[int, int]]
    ok: int
    failed: int
    available: int  # the machine's MemAvailable, bytes: shows memory pressure from other processes


class Sampler(threading.Thread):
    def __init__(self, server, model: str, every_s: float):
        super().__init__(daemon=True, name="soak-sampler")
        self.server, self.model, self.every_s = server, model, every_s
        self.samples: list[Sample] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while True:
            try:
                ok, failed = request_counts(self.server.metrics_url, self.model)
                self.samples.append(Sample(time.monotonic() - self.t0, memory(self.server), ok, failed,
                                           _kib("/proc/meminfo", "MemAvailable:") * 1024))
            except OSError as e:  # a missed sample is not worth ending the soak for
                logger.warning("sample failed: %s", e)
            if self.stop_event.wait(self.every_s):
                return


# --- analysis -------------------------------------------------------------------------------------

def slope(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y over t."""
    if len(t) < 2:
        return 0.0, float(y[0]) if len(y) else 0.0
    a, b = np.polyfit(t, y, 1)
    return float(a), float(b)


def analyse(samples: list[Sample], threshold_mib_per_min: float, request_bytes: int) -> dict:
    t = np.array([s.t for s in samples])
    names = sorted({n for s in samples for n in s.mem})
    rss = np.array([sum(v[0] for v in s.mem.values()) for s in samples], dtype=np.float64)
    pss = np.array([sum(v[1] for v in s.mem.values()) for s in samples], dtype=np.float64)
    half = len(samples) // 2
    th, rh = t[half:], rss[half:]
    rss_slope, rss_icpt = slope(th, rh)
    pss_slope, _ = slope(th, pss[half:])
    per_process = {}
    for n in names:
        y = np.array([s.mem.get(n, (0, 0))[0] for s in samples[half:]], dtype=np.float64)
        per_process[n] = {"rss_mib_start": round(samples[0].mem.get(n, (0, 0))[0] / 2**20, 1),
                          "rss_mib_end": round(samples[-1].mem.get(n, (0, 0))[0] / 2**20, 1),
                          "slope_kib_per_min_second_half": round(slope(th, y)[0] * 60 / 1024, 1)}
    ok = samples[-1].ok - samples[0].ok
    failed = samples[-1].failed - samples[0].failed
    seconds = t[-1] - t[0]
    rate = ok / seconds if seconds > 0 else 0.0
    half_rate = (samples[-1].ok - samples[half].ok) / (t[-1] - t[half]) if t[-1] > t[half] else 0.0
    mib_min = rss_slope * 60 / 2**20
    leak = rss_slope / half_rate if half_rate > 0 else float("nan")
    return {
        "samples": len(samples),
        "sampled_s": round(float(seconds), 1),
        "requests_ok": int(ok),
        "requests_failed": int(failed),
        "throughput_req_per_s": round(rate, 2),
        "processes": len(names),
        "rss_mib_first": round(rss[0] / 2**20, 1),
        "rss_mib_at_half": round(rss[half] / 2**20, 1),
        "rss_mib_last": round(rss[-1] / 2**20, 1),
        "rss_mib_max": round(rss.max() / 2**20, 1),
        "pss_mib_last": round(pss[-1] / 2**20, 1),
        "rss_slope_mib_per_min_second_half": round(mib_min, 3),
        "pss_slope_mib_per_min_second_half": round(pss_slope * 60 / 2**20, 3),
        "rss_second_half_range_mib": round((rh.max() - rh.min()) / 2**20, 2),
        "machine_mem_available_gib_min": round(min(s.available for s in samples) / 2**30, 2),
        "leak_bytes_per_request": round(leak, 1) if np.isfinite(leak) else None,
        "request_tensor_bytes": request_bytes,
        "threshold_mib_per_min": threshold_mib_per_min,
        "no_steady_growth": bool(mib_min < threshold_mib_per_min),
        "fit": {"from_s": round(float(th[0]), 1), "slope_bytes_per_s": rss_slope, "intercept_bytes": rss_icpt},
        "per_process": per_process,
    }


def write_csv(samples: list[Sample], path: Path) -> None:
    names = sorted({n for s in samples for n in s.mem}, key=lambda n: (n != "tritonserver", n))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "rss_total_bytes", "pss_total_bytes", "requests_ok", "requests_failed", "processes",
                    "machine_mem_available_bytes"] + [f"rss_{n}" for n in names])
        for s in samples:
            w.writerow([f"{s.t:.2f}", sum(v[0] for v in s.mem.values()), sum(v[1] for v in s.mem.values()),
                        s.ok, s.failed, len(s.mem), s.available] + [s.mem.get(n, (0, 0))[0] for n in names])


def plot(samples: list[Sample], result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s.t for s in samples]) / 60
    rss = np.array([sum(v[0] for v in s.mem.values()) for s in samples]) / 2**20
    pss = np.array([sum(v[1] for v in s.mem.values()) for s in samples]) / 2**20
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(t, rss, label="RSS, tritonserver + stubs")
    ax.plot(t, pss, label="PSS (shared pages counted once)", alpha=0.7)
    fit = result["fit"]
    tf = np.array([fit["from_s"], samples[-1].t])
    ax.plot(tf / 60, (fit["slope_bytes_per_s"] * tf + fit["intercept_bytes"]) / 2**20, "k--",
            label=f"fit, 2nd half: {result['rss_slope_mib_per_min_second_half']:+.3f} MiB/min "
                  f"(limit {result['threshold_mib_per_min']} MiB/min)")
    ax.set_ylabel("MiB")
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=9)
    ok = np.array([s.ok for s in samples], dtype=np.float64)
    dt = np.diff(np.array([s.t for s in samples]))
    ax2.plot(t[1:], np.diff(ok) / np.where(dt > 0, dt, 1), color="tab:green")
    ax2.set_ylabel("requests/s")
    ax2.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_readme(out: Path, summary: dict, command: str) -> None:
    r, p = summary["memory"], summary["perf_analyzer"]
    lines = [
        "# Soak: tiny CPU repository under perf_analyzer",
        "",
        f"Command (from the repository root): `{command}`",
        "",
        f"Run {summary['started']} on {summary['machine']}; perf_analyzer at concurrency {summary['concurrency']} "
        f"for {summary['duration_s']} s of measurement windows ({r['sampled_s']} s of load in all, its warm-up "
        f"included) on the entry model `thfm` (tasks {','.join(summary['tasks'])}, one "
        f"{summary['grid']} mp4 window per request); memory of tritonserver and its {r['processes'] - 1} python-backend "
        f"stubs sampled every {summary['sample_s']} s.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| verdict | **{'passed' if summary['passed'] else 'FAILED'}** |",
        f"| requests answered (server count) | {r['requests_ok']} |",
        f"| requests failed (server count) | {r['requests_failed']} |",
        f"| perf_analyzer exit status | {p['returncode']} |",
        f"| throughput (perf_analyzer) | {p.get('throughput_infer_per_s', 'n/a')} infer/s |",
        f"| latency p50 / p99 (perf_analyzer) | {p.get('p50_latency_ms', 'n/a')} / {p.get('p99_latency_ms', 'n/a')} ms |",
        f"| RSS total: first / at half / last / max | {r['rss_mib_first']} / {r['rss_mib_at_half']} / "
        f"{r['rss_mib_last']} / {r['rss_mib_max']} MiB |",
        f"| RSS slope, second half (least squares) | {r['rss_slope_mib_per_min_second_half']:+.3f} MiB/min |",
        f"| PSS slope, second half | {r['pss_slope_mib_per_min_second_half']:+.3f} MiB/min |",
        f"| RSS range over the second half | {r['rss_second_half_range_mib']} MiB |",
        f"| slope per request | {r['leak_bytes_per_request']} bytes/request (a request moves "
        f"{r['request_tensor_bytes']} bytes of tensors) |",
        f"| threshold | {r['threshold_mib_per_min']} MiB/min |",
        f"| tritonserver exit during the run | {summary['server_exit'] if summary['server_exit'] is not None else 'none'} |",
        f"| dead stubs | {', '.join(summary['dead_stubs']) or 'none'} |",
        f"| machine MemAvailable, lowest sample | {r['machine_mem_available_gib_min']} GiB |",
        f"| kernel OOM kills during the run (any process) | {len(summary['oom_kills_during_run'])} |",
        "",
        "\"No steady growth\" means the least-squares slope of total RSS (tritonserver plus every stub) over",
        "the second half of the run is below the threshold. The first half is warm-up: lazy imports on the",
        "first request, allocator arenas and gRPC buffers reaching their working size. The threshold is",
        "1 MiB/min. One request moves about 180 kB of tensors, so at 10-20 requests/s a leak of 1% of a",
        "request would already grow RSS by 1-2 MiB/min. The threshold is also well above the sampling noise",
        "of a flat run. The slope per request above does not depend on the machine's speed.",
        "",
        "Per process (RSS MiB at the start and the end, slope over the second half in KiB/min):",
        "",
        "| process | start | end | slope |",
        "|---|---|---|---|",
    ]
    for name, v in r["per_process"].items():
        lines.append(f"| {name} | {v['rss_mib_start']} | {v['rss_mib_end']} | {v['slope_kib_per_min_second_half']:+.1f} |")
    lines += ["", "Files: `rss.csv` (samples), `perf_analyzer.csv` (its CSV), `perf_analyzer.log`, `summary.json`,",
              "`rss.png` (RSS/PSS over time with the fit, and requests/s from the server's counters).", ""]
    (out / "README.md").write_text("\n".join(lines))


# --- the run --------------------------------------------------------------------------------------

def run(args) -> dict:
    from thfm_serve import perf
    from thfm_serve.server import ServerConfig, TritonServer, server_ports

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    repo = prepare_repo(work, Path(args.repo) if args.repo else None, args.concurrency)
    pa = perf.find_perf_analyzer()
    cfg = ServerConfig(repo=repo, **server_ports())
    server = TritonServer(cfg, log_path=work / "server.log")
    server.start(timeout_s=300)
    try:
        opts = perf.PerfOptions(url=server.grpc_url, model="thfm", out=work / "perf", concurrency=(args.concurrency,),
                                measurement_ms=max(1000, int(args.duration * 1000 / 3)),
                                # A soak has a fixed length: three windows, "stable" whatever they show.
                                stability_percentage=1e6, max_trials=3, tasks=tuple(args.tasks.split(",")),
                                timeout_s=args.duration * 3 + 600).validate()
        config = perf.fetch_model_config(opts.url, opts.model)
        p = perf.plan(opts, config, config)
        csv_path = out / "perf_analyzer.csv"
        argv = perf.build_command(pa, opts, args.concurrency, p.input_args, csv_path)
        step = json.loads(Path(p.data_file).read_text())["data"][0]
        video_bytes = len(base64.b64decode(step["video"]["b64"])) - 4  # less the BYTES length prefix
        frames, h, w = p.geometry["frames"], p.geometry["height"], p.geometry["width"]
        request_bytes = _request_bytes(opts.tasks, frames, h, w, video_bytes)
        logger.info("perf_analyzer: %s", shlex.join(argv))

        sampler = Sampler(server, "thfm", args.sample_s)
        sampler.start()
        t0 = time.monotonic()
        boot_s = _uptime()
        pa_log = out / "perf_analyzer.log"
        with open(pa_log, "w") as log_file:
            proc = subprocess.Popen(argv, env=pa.env(host=opts.host), stdout=log_file, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            server_exit, dead = _watch(proc, server, opts.timeout_s)
        wall = time.monotonic() - t0
        if server_exit is None:
            time.sleep(args.sample_s)  # one more sample after the last request
        sampler.stop_event.set()
        sampler.join()
        ooms = _oom_kills_since(boot_s)
    finally:
        server.stop(timeout_s=10)

    samples = sampler.samples
    if len(samples) < 4:
        raise ThfmError(f"only {len(samples)} memory samples; the run was too short")
    result = analyse(samples, args.max_slope_mib_per_min, request_bytes)
    write_csv(samples, out / "rss.csv")
    pa_result: dict = {"returncode": proc.returncode, "wall_s": round(wall, 1), "command": shlex.join(argv)}
    if proc.returncode == 0 and csv_path.is_file():
        rows = perf.read_csv(csv_path)
        if rows:
            pa_result.update(perf.summarize_row(rows[0], frames))
    else:
        lines = [ln.strip() for ln in pa_log.read_text(errors="replace").splitlines() if ln.strip()]
        pa_result["error"] = " | ".join([ln for ln in lines if "error" in ln.lower()][:5] or lines[-3:])
    passed = (proc.returncode == 0 and server_exit is None and result["requests_failed"] == 0
              and result["no_steady_growth"] and not dead)
    summary = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(time.time() - wall)),
        "machine": f"{os.cpu_count()} CPU cores, {_mem_gib()} GiB RAM, {os.uname().machine}",
        "command": args.command,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "tasks": list(opts.tasks),
        "grid": f"{frames}x{h}x{w}",
        "sample_s": args.sample_s,
        "repo": str(repo),
        "dead_stubs": dead,
        # Set when tritonserver itself died during the run (its exit code; -11: SIGSEGV).
        "server_exit": server_exit,
        # The kernel's OOM kills during the run (any process: on a shared machine another job's
        # memory can take the server's stubs down with it).
        "oom_kills_during_run": ooms,
        "passed": bool(passed),
        "perf_analyzer": pa_result,
        "memory": result,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = (f"soak: concurrency {args.concurrency}, {args.duration} s, {result['requests_ok']} requests, "
             f"{result['requests_failed']} failed; RSS {result['rss_mib_first']} -> {result['rss_mib_last']} MiB")
    plot(samples, result, out / "rss.png", title)
    write_readme(out, summary, args.command)
    return summary


def _watch(proc: subprocess.Popen, server, timeout_s: float) -> tuple[int | None, list[str]]:
    """Wait for perf_analyzer; stop it early if tritonserver dies or a stub does (it would only
    collect errors from then on). Returns (server exit code or None, dead stub names)."""
    deadline = time.monotonic() + timeout_s
    dead: list[str] = []
    while proc.poll() is None:
        rc = server.returncode
        dead = dead or server.dead_stubs()
        if rc is not None or dead or time.monotonic() > deadline:
            logger.error("stopping perf_analyzer: %s", f"tritonserver exited with code {rc}" if rc is not None
                         else f"stubs died: {dead}" if dead else "timed out")
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return rc, dead
        time.sleep(0.5)
    return server.returncode, dead or server.dead_stubs()


def _uptime() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _oom_kills_since(uptime_s: float) -> list[str]:
    """'Out of memory: Killed process ...' kernel lines logged after uptime_s (empty if dmesg is not readable)."""
    try:
        text = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in text.splitlines():
        m = re.match(r"^\[\s*([0-9.]+)\]\s+(Out of memory: Killed process.*)$", line)
        if m and float(m.group(1)) >= uptime_s:
            out.append(m.group(2)[:160])
    return out


def _request_bytes(tasks, frames: int, h: int, w: int, payload: int) -> int:
    from thfm_serve.contract.tasks import frame_shape

    joints = 24  # SMPL's, the tiny checkpoint's joint set
    item = np.dtype(np.float32).itemsize
    return payload + sum(item * frames * int(np.prod(frame_shape(t, h, w, joints))) for t in tasks)


def _mem_gib() -> int:
    return round(_kib("/proc/meminfo", "MemTotal:") / 2**20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perf/soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=300, help="seconds of load (default 300)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--tasks", default="depth,normals,segmentation,densepose,keypoints2d,keypoints3d",
                        help="tasks per request (default: all six)")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between memory samples (default 2)")
    parser.add_argument("--max-slope-mib-per-min", type=float, default=DEFAULT_THRESHOLD_MIB_PER_MIN,
                        help="largest RSS slope over the second half that counts as no steady growth (default 1)")
    parser.add_argument("--repo", help="serve this repository (default: export the tiny checkpoint into --work)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "soak"), help="checkpoint, repository and server log")
    parser.add_argument("--out", default=str(ROOT / "perf" / "results" / "soak"), help="figures (default perf/results/soak)")
    args = parser.parse_args(argv)
    args.command = os.environ.get("SOAK_COMMAND") or shlex.join(["perf/soak.py", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.duration < 10 or args.concurrency < 1 or args.sample_s <= 0:
        logger.error("--duration must be >= 10 s, --concurrency >= 1, --sample-s > 0")
        return 2
    try:
        summary = run(args)
    except ThfmError as e:
        logger.error("%s", e)
        return 2
    r = summary["memory"]
    logger.info("%s: %d requests ok, %d failed, %.2f req/s; RSS %.1f -> %.1f MiB, slope %+.3f MiB/min "
                "(limit %.1f) over the second half; figures in %s",
                "PASSED" if summary["passed"] else "FAILED", r["requests_ok"], r["requests_failed"],
                r["throughput_req_per_s"], r["rss_mib_first"], r["rss_mib_last"],
                r["rss_slope_mib_per_min_second_half"], r["threshold_mib_per_min"], args.out)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
