"""One window, all six tasks, stage by stage: the in-process PyTorch fp32 pipeline against the served path.

    .venv/bin/thfm export --checkpoint runs/ck13 --repo runs/repo13_cpu --target cpu --frames 17 --height 256 --width 256
    .venv/bin/python perf/bench_e2e.py --checkpoint runs/ck13 --repo runs/repo13_cpu --out perf/results

Paths, on the same video and the same weights:
  pipeline  thfm_serve.pipeline.ThfmPipeline in fp32: what a user without this project runs.
  served    tritonserver on --repo (exported with `thfm export --target cpu`: the recipe the exporter
            chose for this machine, written in the repository's manifests), the entry model over gRPC
            with every task in one request.

Stages of one request:
  decode video     PyAV decodes the mp4 to RGB frames (thfm_serve.video.read_video). On the caller's side
                   in both paths: the served request carries the frames, so the two paths decode alike.
  encode           the VAE encoder on the window (one call).
  core             the core, one batch row per task (one call).
  decode           the VAE decoder on the dense tasks' rows.
  pre/postprocess  everything else of the window loop (processing.run_clip: fitting the clip to the
                   grid, mapping outputs back to the input's frames and size); served, also the entry
                   model's calls to the other models (tensors between the server's processes).
  wire             served only: the client's round trip minus the entry model's request time
                   (serialisation, gRPC, the server's request handling). The server stops its clock
                   when it releases the request, which can be after the answer has left, so on a
                   request of a few milliseconds this can read a fraction of a millisecond below 0.

In process the stages are timed around the PyTorch modules; served they come from tritonserver's own
per-model statistics (success time per request, queueing included), read before and after each
request. Each stage that does matrix work gets its FLOPs (torch.utils.flop_counter, the core at one
row per task, the decoder at one row per dense task) and its utilisation of this machine's matmul peak
at the stage's precision, measured in the same run (perf/bench_core.py's peak worker).

Drift: the served outputs against the pipeline's, in task units (export.validate.output_drift), the dense
tasks checked against the export's task-unit bounds (contract.specs.VAE_DRIFT_BOUNDS).

Outputs: <out>/<name>.md and <out>/<name>.json, each carrying the command that made it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from thfm_serve.matmul_peak import describe as describe_peak

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "perf") not in sys.path:  # the benchmark helpers are sibling scripts, not a package
    sys.path.insert(0, str(ROOT / "perf"))
logger = logging.getLogger("bench_e2e")

STAGES = ("video", "encode", "core", "decode", "postprocess", "wire")
STAGE_LABELS = {"video": "decode video", "encode": "VAE encode", "core": "core", "decode": "VAE decode",
                "postprocess": "pre/postprocess", "wire": "wire"}
MATRIX_STAGES = ("encode", "core", "decode")
PATHS = ("pipeline", "served")
# Targets of the served path against the pipeline, by machine class (AVX-512 classes and AMX: 3x).
SPEEDUP_TARGET_AVX512 = 3.0
SPEEDUP_TARGET_AVX2 = 2.0
UTILISATION_TARGET = 0.60


# =============================================================================================
# timing
# =============================================================================================

class StageClock:
    """Seconds per stage of one request; wraps callables so their time lands in a stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed


def stats_snapshot(stats: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """tritonclient's get_inference_statistics(as_json=True) -> {model: {"count": n, "ns": total}} of
    successful requests (the JSON form writes its 64-bit counters as strings)."""
    out = {}
    for m in stats.get("model_stats", []):
        success = m.get("inference_stats", {}).get("success", {})
        out[m["name"]] = {"count": int(success.get("count", 0)), "ns": int(success.get("ns", 0))}
    return out


def settled_stats(snapshot: Callable[[], dict[str, dict[str, int]]], before: Mapping[str, Mapping[str, int]],
                  entry: str, timeout_s: float = 30.0, poll_s: float = 0.05) -> dict[str, dict[str, int]]:
    """The statistics once the server has recorded the request that just returned.

    tritonserver counts a request after its response is on the way, so a snapshot taken the moment
    the client has the answer can miss it. Waits for the entry model's count to grow, then for two
    equal snapshots in a row (the nested models' counts are settled too); raises after timeout_s."""
    deadline = time.monotonic() + timeout_s
    base = before.get(entry, {"count": 0})["count"]
    prev = None
    while True:
        cur = snapshot()
        if cur.get(entry, {"count": 0})["count"] > base and cur == prev:
            return cur
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the server recorded no successful request of {entry!r} within {timeout_s:.0f} s")
        prev = cur
        time.sleep(poll_s)


def served_stages(before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]],
                  entry: str, encoder: str, core: str, decoder: str, wall_s: float, video_s: float) -> dict[str, float]:
    """One request's stages from two statistics snapshots around it and the client's wall time.

    A model's success time covers its requests from arrival to response, queueing included. The entry
    model's covers the whole request on the server, its calls to the other models included, so its own
    share (pre/postprocess) is the remainder, and the client's round trip minus it is the wire. The
    wire is not clamped: the server's request end is its release of the request, which may follow the
    response, so a tiny request can show a slightly negative wire, and hiding that would hide the skew."""
    def spent(model: str) -> float:
        a, b = after.get(model, {"ns": 0}), before.get(model, {"ns": 0})
        return (a["ns"] - b["ns"]) / 1e9

    enc, cor, dec, whole = spent(encoder), spent(core), spent(decoder), spent(entry)
    if whole <= 0:
        raise RuntimeError(f"the server recorded no successful request of {entry!r} for this call")
    return {"video": video_s, "encode": enc, "core": cor, "decode": dec, "postprocess": whole - enc - cor - dec,
            "wire": wall_s - whole}


def summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Median per stage and of the totals over the timed runs (the median request, stage by stage)."""
    totals = [sum(r.values()) for r in runs]
    stages = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in STAGES if any(s in r for r in runs)}
    return {"runs": runs, "totals_s": totals, "median_s": statistics.median(totals), "stages_s": stages}


# =============================================================================================
# workers (one subprocess per path: each path's peak RSS is its own)
# =============================================================================================

def _flatten(results: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    from thfm_serve.contract.tasks import OUTPUT_KEYS

    return {t: np.asarray(v[OUTPUT_KEYS[t]]) for t, v in results.items()}


def pipeline_worker(job: dict[str, Any]) -> dict[str, Any]:
    from bench_core import peak_rss_mb
    from engines import set_torch_threads
    from thfm_serve.pipeline import ThfmPipeline
    from thfm_serve.video import read_video

    threads = set_torch_threads(job["threads"])
    t0 = time.perf_counter()
    pipe = ThfmPipeline.from_checkpoint(job["checkpoint"])
    load_s = time.perf_counter() - t0
    clock = StageClock()
    pipe.encoder = clock.wrap("encode", pipe.encoder)
    pipe.core = clock.wrap("core", pipe.core)
    pipe.decoder = clock.wrap("decode", pipe.decoder)

    def run() -> tuple[dict[str, float], dict[str, np.ndarray]]:
        clock.reset()
        with clock.stage("video"):
            frames = read_video(job["video"]).frames
        t = time.perf_counter()
        out = pipe.run(frames, list(job["tasks"]), job["height"], job["width"], job["frames"])
        whole = time.perf_counter() - t
        clock.add("postprocess", whole - sum(clock.seconds.get(s, 0.0) for s in MATRIX_STAGES))
        return dict(clock.seconds), _flatten(out)

    runs, out = _repeat(run, job["runs"], job["warmup"])
    np.savez(job["outputs"], **out)
    return {**summarise(runs), "load_s": load_s, "peak_rss_mb": peak_rss_mb(), "threads": threads,
            "warmup": job["warmup"]}


def served_worker(job: dict[str, Any]) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    from bench_core import _group_hwm_mb
    from thfm_serve import serving
    from thfm_serve.contract import protocol
    from thfm_serve.server import ServerConfig, TritonServer, server_ports
    from thfm_serve.video import read_video

    repo = Path(job["repo"])
    assets = serving.load_assets(repo)
    precisions = {m: assets.specs[m].precision for m in (protocol.VAE_ENCODER, protocol.CORE, protocol.VAE_DECODER)}
    runtimes = {m: assets.specs[m].runtime for m in precisions}
    cfg = ServerConfig(repo=repo, **server_ports())
    tasks = list(job["tasks"])
    t0 = time.perf_counter()
    with TritonServer(cfg, log_path=Path(job["workdir"]) / "server.log") as server:
        load_s = time.perf_counter() - t0
        # Given channel_args, tritonclient drops its own defaults, among them the unlimited message
        # sizes: the dense outputs of one 17x256x256 window are tens of MB.
        client = grpcclient.InferenceServerClient(server.grpc_url, channel_args=[
            ("grpc.enable_http_proxy", 0), ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_receive_message_length", 2**31 - 1)])
        outputs = [grpcclient.InferRequestedOutput(protocol.OUTPUT_FOR_TASK[t]) for t in tasks]

        def run() -> tuple[dict[str, float], dict[str, np.ndarray]]:
            tv = time.perf_counter()
            frames = read_video(job["video"]).frames
            video_s = time.perf_counter() - tv
            inputs = [grpcclient.InferInput(protocol.INPUT_FRAMES, list(frames.shape), "UINT8"),
                      grpcclient.InferInput(protocol.INPUT_TASKS, [len(tasks)], "BYTES")]
            inputs[0].set_data_from_numpy(frames)
            inputs[1].set_data_from_numpy(np.array([t.encode() for t in tasks], dtype=np.object_))
            before = stats_snapshot(client.get_inference_statistics(as_json=True))
            tw = time.perf_counter()
            r = client.infer(protocol.ENTRY_MODEL, inputs, outputs=outputs, client_timeout=3600)
            wall = time.perf_counter() - tw
            after = settled_stats(lambda: stats_snapshot(client.get_inference_statistics(as_json=True)),
                                  before, protocol.ENTRY_MODEL)
            stages = served_stages(before, after, protocol.ENTRY_MODEL, protocol.VAE_ENCODER, protocol.CORE,
                                   protocol.VAE_DECODER, wall, video_s)
            return stages, {t: r.as_numpy(protocol.OUTPUT_FOR_TASK[t]) for t in tasks}

        runs, out = _repeat(run, job["runs"], job["warmup"])
        hwm = _group_hwm_mb(server.pid)
        client.close()
    np.savez(job["outputs"], **out)
    return {**summarise(runs), "load_s": load_s, "peak_rss_mb": sum(hwm.values()), "processes": len(hwm),
            "precisions": precisions, "runtimes": runtimes, "threads": job["threads"], "warmup": job["warmup"]}


def _repeat(run: Callable[[], tuple[dict[str, float], Any]], runs: int, warmup: int) -> tuple[list[dict[str, float]], Any]:
    first = None
    for _ in range(warmup):
        _, out = run()
        first = out if first is None else first
    timed = []
    for _ in range(runs):
        stages, out = run()
        timed.append(stages)
        first = out if first is None else first
        logger.info("run: %.2f s (%s)", sum(stages.values()), ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    return timed, first


WORKERS = {"pipeline": pipeline_worker, "served": served_worker}


def worker_main(job_path: str, result_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    res = WORKERS[job["worker"]](job)
    Path(result_path).write_text(json.dumps(res))
    return 0


# =============================================================================================
# parent
# =============================================================================================

def run_subprocess(script: Path, job: dict[str, Any], label: str, threads: int, timeout_s: float) -> dict[str, Any]:
    """A worker of `script` (this file, or perf/bench_core.py for the peak and FLOP workers) in its own
    process, with the thread count in the environment; raises when it fails (no partial table)."""
    with tempfile.TemporaryDirectory() as tmp:
        jp, rp = Path(tmp) / "job.json", Path(tmp) / "result.json"
        jp.write_text(json.dumps(job))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        logger.info("%s ...", label)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), "--worker", str(jp), str(rp)], env=env, cwd=str(ROOT),
                              capture_output=True, text=True, timeout=timeout_s)
        res = json.loads(rp.read_text()) if rp.is_file() else None
        if proc.returncode != 0 or res is None or res.get("status") == "failed":
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise RuntimeError(f"{label} failed (exit {proc.returncode}): {res and res.get('error')}\n{tail}")
        logger.info("%s done in %.1f s", label, time.perf_counter() - t0)
        return res


def make_video(path: Path, frames: int, height: int, width: int) -> Path:
    """A walking-figure clip at the window's size (thfm_serve.clipgen), as the mp4 a user would send."""
    from thfm_serve.clipgen import walking_clip
    from thfm_serve.video import encode_video

    path.parent.mkdir(parents=True, exist_ok=True)
    encode_video(walking_clip(frames, height, width, seed=0), path)
    return path


def drift(served: Mapping[str, np.ndarray], pipeline: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The served outputs against the pipeline's in task units, and the export's task-unit bounds."""
    from thfm_serve.export.validate import output_drift
    from thfm_serve.contract.specs import VAE_DRIFT_BOUNDS

    rows = {t: output_drift(t, pipeline[t], served[t]) for t in pipeline if t in served}
    checks = []
    for b in VAE_DRIFT_BOUNDS:
        if b.task in rows:
            value = rows[b.task].get(b.metric)
            checks.append({"bound": b.describe(), "task": b.task, "metric": b.metric, "value": value,
                           "ok": value is not None and b.ok(value)})
    return {"tasks": rows, "bounds": checks}


def utilisation(stages: Mapping[str, float], flops: Mapping[str, float], precisions: Mapping[str, str],
                peak: Mapping[str, float | None]) -> dict[str, dict[str, Any]]:
    """Achieved GFLOP/s of each matrix stage and its share of the measured peak at its precision."""
    out = {}
    for s in MATRIX_STAGES:
        sec, f = stages.get(s), flops.get(s)
        p = peak.get(precisions[s])
        if not sec or not f:
            continue
        gfs = f / sec / 1e9
        out[s] = {"gflops": gfs, "precision": precisions[s], "peak_gflops": p, "of_peak": gfs / p if p else None}
    return out


def speedup_target(machine_class: str) -> float:
    return SPEEDUP_TARGET_AVX512 if machine_class.startswith(("amx", "avx512")) else SPEEDUP_TARGET_AVX2


def annotate(r: dict[str, Any]) -> None:
    """Derived numbers: shares, utilisation per stage, speed-up, targets (recomputable with --report)."""
    peak = r["peak"]["peak"]
    f = r["flops"]
    n_dense = len([t for t in r["tasks"] if t in r["dense_tasks"]])
    flops = {"encode": f["vae_encoder"], "core": f["core"], "decode": f["vae_decoder"] * n_dense}
    r["stage_flops"] = flops
    for path in PATHS:
        p = r[path]
        p["share"] = {s: v / p["median_s"] for s, v in p["stages_s"].items()}
        prec = {"encode": "fp32", "core": "fp32", "decode": "fp32"} if path == "pipeline" else {
            "encode": p["precisions"]["vae_encoder"], "core": p["precisions"]["core"],
            "decode": p["precisions"]["vae_decoder"]}
        p["utilisation"] = utilisation(p["stages_s"], flops, prec, peak)
    r["speedup"] = r["pipeline"]["median_s"] / r["served"]["median_s"]
    target = speedup_target(r["machine"]["class"])
    low = {s: u["of_peak"] for s, u in r["served"]["utilisation"].items() if u["of_peak"] is not None and u["of_peak"] < UTILISATION_TARGET}
    r["targets"] = [
        {"target": f"served end to end >= {target:g}x faster than the in-process PyTorch fp32 pipeline "
                   f"({r['machine']['class']} class)", "met": r["speedup"] >= target,
         "evidence": f"{r['speedup']:.2f}x ({r['served']['median_s']:.1f} s vs {r['pipeline']['median_s']:.1f} s)"},
        {"target": f"every served matrix stage >= {UTILISATION_TARGET:.0%} of the measured peak at its precision",
         "met": not low, "evidence": ", ".join(f"{STAGE_LABELS[s]} {v:.2%}" for s, v in low.items()) or "all at or above"},
        {"target": "task drift of the served outputs within the export's task-unit bounds",
         "met": all(c["ok"] for c in r["drift"]["bounds"]),
         "evidence": "; ".join(f"{c['task']} {c['metric']} {c['value']:.4g} ({c['bound']})" for c in r["drift"]["bounds"])},
    ]


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    isa = ", ".join(k for k, v in m["isa"].items() if v) or "none of the tracked ones"
    pl, sv = r["pipeline"], r["served"]
    lines = [
        f"# THFM end to end, all six tasks, stage by stage: {r['name']}", "",
        "Command:", "", "```", r["command"], "```", "",
        f"Machine: **{m['class']}** class ({m['model']}; {isa}), {m['cores']} cores, {m['mem_gb']} GiB. "
        f"Threads: {r['threads']}. Medians of {len(pl['runs'])} (pipeline) and {len(sv['runs'])} (served) timed "
        f"requests after {pl.get('warmup', r['warmup'])} and {sv.get('warmup', r['warmup'])} warm-up ones. "
        f"Started {r['started']}, 1-min load {r['loadavg'][0]:.2f} at start, {r['loadavg'][1]:.2f} at end.", "",
        f"Input: {r['video_note']}; tasks {', '.join(r['tasks'])} in one request; checkpoint `{r['checkpoint']}`, "
        f"repository `{r['repo']}` (served precisions: " +
        ", ".join(f"{k} {v}" + (f" in {sv['runtimes'][k]}" if k in sv.get("runtimes", {}) else "")
                  for k, v in sv["precisions"].items()) + ").", "",
        "Matmul peak in the same run (perf/bench_core.py's peak worker): "
        + describe_peak({"machine_class": r["machine"]["class"], **r["peak"]}) + ".", "",
        "| stage | FLOPs | pipeline (PyTorch fp32) | share | % of fp32 peak | served | share | precision | % of its peak |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for s in STAGES:
        f = r["stage_flops"].get(s)
        pu, su = pl["utilisation"].get(s, {}), sv["utilisation"].get(s, {})
        pt = pl["stages_s"].get(s)
        lines.append(
            f"| {STAGE_LABELS[s]} | {f / 1e12:.2f} TFLOP |" if f else f"| {STAGE_LABELS[s]} | - |")
        lines[-1] += (f" {pt:.2f} s | {pl['share'][s]:.0%} |" if pt is not None else " - | - |")
        lines[-1] += (f" {pu['of_peak']:.0%} |" if pu.get("of_peak") is not None else " - |")
        lines[-1] += f" {sv['stages_s'][s]:.2f} s | {sv['share'][s]:.0%} |"
        lines[-1] += (f" {su['precision']} | {su['of_peak']:.0%} |" if su.get("of_peak") is not None else " - | - |")
    lines += [
        f"| **total** | | **{pl['median_s']:.2f} s** | | | **{sv['median_s']:.2f} s** | | | |", "",
        f"Served is **{r['speedup']:.2f}x** the pipeline's speed. Peak RSS: pipeline {pl['peak_rss_mb'] / 1e3:.1f} GB; "
        f"server {sv['peak_rss_mb'] / 1e3:.1f} GB over {sv['processes']} processes. Load: pipeline {pl['load_s']:.1f} s, "
        f"server start {sv['load_s']:.1f} s. Per-request totals: pipeline " +
        ", ".join(f"{t:.2f}" for t in pl["totals_s"]) + " s; served " + ", ".join(f"{t:.2f}" for t in sv["totals_s"]) + " s.",
        "", "## Drift: served against the pipeline, in task units", "",
        "| task | metric | value |", "|---|---|---:|",
    ]
    for task, row in r["drift"]["tasks"].items():
        for k, v in row.items():
            lines.append(f"| {task} | {k} | {v:.4g} |")
    lines += ["", "## Targets", "", "| target | met | evidence |", "|---|---|---|"]
    for t in r["targets"]:
        lines.append(f"| {t['target']} | {'yes' if t['met'] else '**no**'} | {t['evidence']} |")
    for note in r.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from thfm_serve.config import TASKS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="THFM checkpoint (the pipeline's weights)")
    p.add_argument("--repo", required=True, help="the repository `thfm export` made from the same checkpoint")
    p.add_argument("--video", help="input video (default: a walking-figure mp4 at the window's size)")
    p.add_argument("--frames", type=int, help="window frames (default: the repository's export grid)")
    p.add_argument("--height", type=int, help="default: the repository's export grid")
    p.add_argument("--width", type=int, help="default: the repository's export grid")
    p.add_argument("--tasks", default=",".join(TASKS), help="default: all six")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--paths", default=",".join(PATHS), help="which paths to run (the other's numbers are reused "
                   "from the workdir, where every run keeps each path's result)")
    p.add_argument("--matmul-size", type=int, default=3072, help="square matmul size of the peak measurement")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "bench_e2e"))
    p.add_argument("--out", default=str(ROOT / "perf" / "results"))
    p.add_argument("--name", help="result file stem (default e2e_<checkpoint>_<F>x<H>x<W>)")
    p.add_argument("--timeout-s", type=float, default=7200.0, help="limit per worker")
    return p.parse_args(argv)


def report_main(path: Path) -> int:
    """`bench_e2e.py --report RESULT.json`: the derived numbers and the .md again from a run's JSON."""
    r = json.loads(path.read_text())
    annotate(r)
    write(r, path.parent)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    modes = {"--worker": lambda rest: worker_main(rest[0], rest[1]), "--report": lambda rest: report_main(Path(rest[0]))}
    if argv[:1] and argv[0] in modes:
        if argv[0] == "--report":
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        return modes[argv[0]](argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    a = parse_args(argv)
    from bench_core import cpu_info, loadavg
    from thfm_serve import serving
    from thfm_serve.config import DENSE_TASKS
    from thfm_serve.contract.tasks import parse_tasks

    repo, ck = Path(a.repo).resolve(), Path(a.checkpoint).resolve()
    assets = serving.load_assets(repo)
    grid = assets.manifest.get("grid", {})  # the export grid (repository.py writes it)
    frames, height, width = a.frames or grid.get("window"), a.height or grid.get("height"), a.width or grid.get("width")
    if not (frames and height and width):
        raise SystemExit(f"give --frames/--height/--width: {repo} does not state its grid")
    tasks = parse_tasks(a.tasks, assets.tasks)
    name = a.name or f"e2e_{ck.name}_{frames}x{height}x{width}"
    work = Path(a.workdir).resolve() / name
    work.mkdir(parents=True, exist_ok=True)
    video = Path(a.video).resolve() if a.video else make_video(work / "input.mp4", frames, height, width)
    r: dict[str, Any] = {
        "name": name, "command": f"cd {ROOT} && .venv/bin/python perf/bench_e2e.py {shlex.join(argv)}",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": cpu_info(), "threads": a.threads,
        "runs": a.runs, "warmup": a.warmup, "tasks": tasks, "dense_tasks": list(DENSE_TASKS),
        "checkpoint": str(a.checkpoint), "repo": str(a.repo),
        "video_note": (f"`{a.video}`" if a.video else f"a {frames}-frame {width}x{height} walking-figure mp4 "
                       "(thfm_serve.clipgen, seed 0)"),
        "loadavg": [loadavg()], "notes": []}
    bench_core = ROOT / "perf" / "bench_core.py"
    r["peak"] = run_subprocess(bench_core, {"worker": "peak", "threads": a.threads, "matmul_size": a.matmul_size},
                               "matmul peak", a.threads, a.timeout_s)
    r["flops"] = run_subprocess(bench_core, {"worker": "flops", "checkpoint": str(ck), "frames": frames,
                                             "height": height, "width": width, "batch": len(tasks)},
                                "flop counter", a.threads, a.timeout_s)
    common = {"checkpoint": str(ck), "repo": str(repo), "video": str(video), "frames": frames, "height": height,
              "width": width, "tasks": tasks, "runs": a.runs, "warmup": a.warmup, "threads": a.threads,
              "workdir": str(work)}
    paths = [p for p in a.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"--paths: unknown {unknown}; choose from {', '.join(PATHS)}")
    # The paths to measure first: each is kept as soon as it is measured, before a missing one stops the run.
    for path in sorted(PATHS, key=lambda p: p not in paths):
        # Each path's result is kept in the workdir as soon as it is measured: a later failure (or
        # --paths) leaves it for the next run, whose report then says it was reused.
        kept = work / f"{path}.json"
        if path in paths:
            r[path] = run_subprocess(Path(__file__).resolve(), {**common, "worker": path,
                                                                "outputs": str(work / f"{path}.npz")},
                                     f"{path} path", a.threads, a.timeout_s)
            kept.write_text(json.dumps({"started": r["started"], "command": r["command"], "result": r[path]}))
        elif kept.is_file():
            earlier = json.loads(kept.read_text())
            r[path] = earlier["result"]
            r["notes"].append(f"The {path} path's numbers are reused from an earlier run (started {earlier['started']}, "
                              f"same checkpoint, repository and input): `{earlier['command']}`.")
        else:
            raise SystemExit(f"--paths leaves out {path} and {kept} holds no earlier result to reuse")
    r["loadavg"].append(loadavg())
    outs = {p: dict(np.load(work / f"{p}.npz")) for p in PATHS}
    r["drift"] = drift(outs["served"], outs["pipeline"])
    annotate(r)
    write(r, Path(a.out))
    return 0


def write(r: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{r['name']}.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    (out / f"{r['name']}.md").write_text(markdown(r))
    logger.info("wrote %s.{md,json} in %s", r["name"], out)
    for t in r["targets"]:
        logger.info("target %s: %s (%s)", t["target"], "met" if t["met"] else "NOT met", t["evidence"])


if __name__ == "__main__":
    sys.exit(main())
