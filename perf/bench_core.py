"""Benchmark THFM's CPU engines in one run: core, VAE and end to end, against the diffusers peer.

    .venv/bin/python perf/bench_core.py --checkpoint runs/ck13 --frames 17 --height 256 --width 256

What is timed, on the same weights and input shape:
  core     diffusers' WanTransformer3DModel in eager fp32 (the peer: what a user runs without us),
           our PyTorch core (perf/engines.py torch-fp32 / torch-bf16, optionally torch.compile),
           onnxruntime fp32 and int8 Q/DQ on the exporter's ONNX files (export_repository), and
           TensorRT where it exists (reported as not available otherwise, never faked);
  vae      encoder and decoder per engine (torch fp32/bf16, onnxruntime fp32);
  e2e      the in-process ThfmPipeline (fp32, bf16), the served repository's engines in-process
           (serving.run_entry without a server) and the served path (tritonserver, entry model over
           gRPC), on the same clip and tasks.

Each engine runs in its own subprocess, so its peak RSS (ru_maxrss; for the server, the VmHWM of every
process in the server's group) is its own. Latency is the median of --runs timed calls after
--warmup untimed ones. FLOPs per forward are counted analytically from the Wan config and
cross-checked with torch.utils.flop_counter on the meta device; utilisation is achieved FLOP/s over
this machine's matmul peak at the engine's precision, measured in the same run (large matmuls in
torch fp32/bf16/int8 and onnxruntime fp32/int8 on the same threads; the best per precision counts).

Outputs: <out>/<name>.md (tables), <out>/<name>.png (plot), <out>/<name>.json (raw numbers), each
carrying the command that made it. Exported ONNX files are cached under --workdir (manifests make a
stale export rebuild, see export/manifest.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from thfm_serve.contract.geometry import LATENT_CHANNELS, latent_frames, latent_size

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench_core")

CORE_ENGINES = ("diffusers-fp32", "torch-fp32", "torch-bf16", "torch-bf16-compile", "ort-fp32", "ort-int8", "ort-int8-trt",
                "tensorrt")
DEFAULT_CORE_ENGINES = ("diffusers-fp32", "torch-fp32", "torch-bf16", "ort-fp32", "ort-int8", "ort-int8-trt", "tensorrt")
VAE_ENGINES = ("torch-fp32", "torch-bf16", "ort-fp32")
E2E_PATHS = ("pipeline-fp32", "pipeline-bf16", "repo-inprocess-fp32", "served-fp32")
PEER = "diffusers-fp32"
REFERENCE = "torch-fp32"  # accuracy reference for the core and the VAE
# int8 engines whose attention products (QK^T, PV) and input/output projections stay fp32: their
# mixed roofline counts those FLOPs at the fp32 peak and the rest at the int8 peak.
MIXED_INT8 = ("ort-int8", "ort-int8-trt")
FP32_IN_MIXED = ("self_attn_qk_av", "cross_attn_qk_av", "patch_embed", "text_embed", "proj_out")
DEFAULT_TASKS = ("depth", "keypoints2d")  # one dense, one sparse task (as `thfm perf`)
PRECISION_OF = {"diffusers-fp32": "fp32", "torch-fp32": "fp32", "torch-bf16": "bf16", "torch-bf16-compile": "bf16",
                "ort-fp32": "fp32", "ort-int8": "int8", "ort-int8-trt": "int8", "tensorrt": "-", "pipeline-fp32": "fp32",
                "pipeline-bf16": "bf16", "repo-inprocess-fp32": "fp32", "served-fp32": "fp32"}


# =============================================================================================
# helpers shared by parent and workers
# =============================================================================================

def rss_mb() -> float:
    """Current RSS of this process in MB (from /proc, no psutil needed in workers)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux: KB


def time_calls(fn: Callable[[], Any], runs: int, warmup: int) -> tuple[list[float], Any]:
    """(per-call seconds of `runs` timed calls, output of the first call) after `warmup` calls."""
    first = None
    for i in range(warmup):
        out = fn()
        if i == 0:
            first = out
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if first is None:
            first = out
    return times, first


def cpu_info() -> dict[str, Any]:
    """The machine: its CPU's instruction sets and class (thfm_serve.machine), cores and memory."""
    from thfm_serve.machine import read_cpu

    cpu = read_cpu()
    return {
        "model": cpu.model,
        "class": cpu.machine_class,
        "cores": len(os.sched_getaffinity(0)),
        "isa": cpu.isa,
        "mem_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "platform": platform.platform(),
    }


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# =============================================================================================
# FLOPs
# =============================================================================================

def core_flops(tcfg: dict[str, Any], text_len: int, frames: int, height: int, width: int, batch: int = 1,
               with_tokens: bool = True) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one core forward, by component, from the Wan config.

    Tokens: S = T' * (H/16) * (W/16) video tokens (+ T frame tokens for THFM, T = 4(T'-1)+1).
    Per block: self-attention QKV/O projections 4*2*N*D^2, QK^T and AV 2*2*N^2*D; cross-attention
    Q/O projections 2*2*N*D^2, K/V on the text 2*2*L*D^2, QK^T and AV 2*2*N*L*D; FFN 2*2*N*D*F.
    Outside the blocks: patch embedding (1x2x2 conv, 16 channels in), text embedder (2 linears),
    output projection, THFM keypoint heads. Elementwise ops (norms, GELU, softmax, rotary) are not
    counted: they are not matmul work and the utilisation figure is against a matmul peak.
    """
    d = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    f = tcfg["ffn_dim"]
    layers = tcfg["num_layers"]
    text_dim = tcfg["text_dim"]
    from thfm_serve.contract.geometry import PATCH_SPATIAL, video_tokens

    patch = PATCH_SPATIAL * PATCH_SPATIAL  # the 1x2x2 patch: latent values per token and channel
    c_in = tcfg["in_channels"] * patch
    c_out = tcfg["out_channels"] * patch
    s = video_tokens(frames, height, width)
    t = frames if with_tokens else 0
    n = s + t
    L = text_len
    per_block = {
        "self_attn_proj": 4 * 2 * n * d * d,
        "self_attn_qk_av": 2 * 2 * n * n * d,
        "cross_attn_proj": 2 * 2 * n * d * d + 2 * 2 * L * d * d,
        "cross_attn_qk_av": 2 * 2 * n * L * d,
        "ffn": 2 * 2 * n * d * f,
    }
    out = {k: float(v * layers * batch) for k, v in per_block.items()}
    out["patch_embed"] = float(2 * s * c_in * d * batch)
    out["text_embed"] = float(2 * L * (text_dim * d + d * d) * batch)
    out["proj_out"] = float(2 * s * d * c_out * batch)
    out["total"] = float(sum(out.values()))
    out["tokens"] = n
    out["video_tokens"] = s
    return out


def flop_counter_worker(job: dict[str, Any]) -> dict[str, Any]:
    """torch.utils.flop_counter on the meta device: the same model shapes, no weights, no time."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    from thfm_serve.config import ThfmConfig
    from thfm_serve.model import ThfmCore, ThfmHeads, VaeDecoder, VaeEncoder

    ck = Path(job["checkpoint"])
    tcfg = json.loads((ck / "transformer" / "config.json").read_text())
    vcfg = json.loads((ck / "vae" / "config.json").read_text())
    cfg = ThfmConfig.load(ck / "thfm" / "config.json")
    frames, height, width, batch = job["frames"], job["height"], job["width"], job["batch"]
    lt = latent_frames(frames)
    out: dict[str, Any] = {}
    with torch.device("meta"):
        tr = WanTransformer3DModel.from_config({k: v for k, v in tcfg.items() if not k.startswith("_")})
        heads = ThfmHeads(tr.config.num_attention_heads * tr.config.attention_head_dim, cfg)
        core = ThfmCore(tr, heads, cfg.root_joint).eval()
        latent = torch.empty(batch, LATENT_CHANNELS, lt, latent_size(height), latent_size(width))
        text = torch.empty(batch, cfg.text_len, cfg.text_dim)
        with torch.no_grad():
            fc = FlopCounterMode(display=False)
            with fc:
                core(latent, text)
            out["core"] = float(fc.get_total_flops())
            fc = FlopCounterMode(display=False)
            with fc:
                tr(hidden_states=latent, timestep=torch.zeros(batch), encoder_hidden_states=text, return_dict=False)
            out["peer"] = float(fc.get_total_flops())
        try:
            vae = AutoencoderKLWan.from_config({k: v for k, v in vcfg.items() if not k.startswith("_")})
            with torch.no_grad():
                fc = FlopCounterMode(display=False)
                with fc:
                    VaeEncoder(vae)(torch.empty(1, 3, frames, height, width))
                out["vae_encoder"] = float(fc.get_total_flops())
                fc = FlopCounterMode(display=False)
                with fc:
                    VaeDecoder(vae)(torch.empty(1, LATENT_CHANNELS, lt, latent_size(height), latent_size(width)))
                out["vae_decoder"] = float(fc.get_total_flops())
        except Exception as e:  # the VAE's feature cache may not trace on meta; the core numbers stand
            out["vae_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


# =============================================================================================
# matmul peak
# =============================================================================================

def peak_worker(job: dict[str, Any]) -> dict[str, Any]:
    """GFLOP/s of large matmuls per precision and backend, on the benchmark's thread count."""
    from engines import set_torch_threads

    from thfm_serve.matmul_peak import BENCH_SIZE, measure

    threads = set_torch_threads(job["threads"])
    return measure(threads, size=job.get("matmul_size", BENCH_SIZE), runs=job.get("matmul_runs", 7))


# =============================================================================================
# inputs
# =============================================================================================

def core_inputs(ck_path: Path, frames: int, height: int, width: int, batch: int) -> dict[str, np.ndarray]:
    """latent ~ N(0,1) (a normalised Wan latent), text = the checkpoint's cached task embeddings
    (real prompt rows with zero padding, as served), one row per task."""
    from safetensors.numpy import load_file

    from thfm_serve.config import TASKS

    emb = load_file(str(ck_path / "thfm" / "thfm.safetensors"))
    rows = [emb[f"prompt_embeds.{t}"] for t in TASKS if f"prompt_embeds.{t}" in emb]
    text = np.stack([rows[i % len(rows)] for i in range(batch)]).astype(np.float32)
    lt = latent_frames(frames)
    latent = np.random.default_rng(0).standard_normal(
        (batch, LATENT_CHANNELS, lt, latent_size(height), latent_size(width))).astype(np.float32)
    return {"latent": latent, "text": text}


def clip_frames(frames: int, height: int, width: int) -> np.ndarray:
    from thfm_serve.clipgen import walking_clip

    return walking_clip(frames, height, width, seed=0)


def compare(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], precision: str, kinds: dict[str, str]) -> dict[str, Any]:
    """max |diff| per output and whether it is inside the export tolerance at that precision."""
    from thfm_serve.contract.specs import tolerance_for

    out: dict[str, Any] = {"ok": True, "outputs": {}}
    for name, r in ref.items():
        if name not in got:
            continue
        g = np.asarray(got[name], dtype=np.float64)
        if g.shape != r.shape:
            out["outputs"][name] = {"error": f"shape {list(g.shape)} != {list(r.shape)}"}
            out["ok"] = False
            continue
        tol = tolerance_for(precision if precision in ("fp32", "bf16", "fp16", "int8") else "fp32", kinds.get(name, "latent"))
        ok, max_abs, max_rel = tol.check(g, r)
        out["outputs"][name] = {"max_abs": max_abs, "ok": ok, "atol": tol.atol, "rtol": tol.rtol}
        out["ok"] = out["ok"] and ok
    return out


CORE_KINDS = {"pred_latent": "latent", "kp2d": "keypoints", "kp3d": "keypoints"}
VAE_KINDS = {"latent": "latent", "maps": "maps"}


# =============================================================================================
# workers
# =============================================================================================

def core_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    import engines

    name = job["engine"]
    ck = Path(job["checkpoint"])
    threads = engines.set_torch_threads(job["threads"])
    feed = core_inputs(ck, job["frames"], job["height"], job["width"], job["batch"])
    rss0 = rss_mb()
    t0 = time.perf_counter()
    if name == "diffusers-fp32":
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel.from_pretrained(ck, subfolder="transformer", torch_dtype=torch.float32).eval()
        lat, txt = torch.from_numpy(feed["latent"]), torch.from_numpy(feed["text"])
        ts = torch.zeros(lat.shape[0])

        def run():
            with torch.inference_mode():
                return {"velocity": model(hidden_states=lat, timestep=ts, encoder_hidden_states=txt, return_dict=False)[0].numpy()}
    else:
        if name in ("torch-fp32", "torch-bf16", "torch-bf16-compile"):
            kind = "torch-fp32" if name == "torch-fp32" else "torch-bf16"
            eng = engines.load_core_engine(kind, ck, threads=threads, compile=name.endswith("compile"))
        else:
            eng = engines.load_core_engine("onnxruntime", job["onnx"], threads=threads)

        def run():
            return eng(feed)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    if name.endswith("compile"):
        t1 = time.perf_counter()
        run()
        job["compile_s"] = time.perf_counter() - t1
    times, out = time_calls(run, job["runs"], job["warmup"])
    res: dict[str, Any] = {"times_s": times, "median_s": statistics.median(times), "load_s": load_s,
                           "rss_before_load_mb": rss0, "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
                           "threads": threads}
    if "compile_s" in job:
        res["compile_s"] = job["compile_s"]
    work = Path(job["workdir"])
    ref_path = work / f"ref_core_{job['shape_key']}.npz"
    if name == REFERENCE:
        np.savez(ref_path, **out)
    elif name != PEER and ref_path.is_file():
        ref = dict(np.load(ref_path))
        res["accuracy"] = compare(out, ref, PRECISION_OF[name], CORE_KINDS)
    return res


def vae_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    import engines
    from thfm_serve.processing import fit_clip
    from thfm_serve.contract.protocol import VAE_ENCODER

    name, which = job["engine"], job["which"]
    ck = Path(job["checkpoint"])
    threads = engines.set_torch_threads(job["threads"])
    frames, height, width = job["frames"], job["height"], job["width"]
    if which == VAE_ENCODER:
        feed = {"video": fit_clip(clip_frames(frames, height, width), frames, height, width).numpy()}
    else:
        feed = {"latent": core_inputs(ck, frames, height, width, 1)["latent"]}
    rss0 = rss_mb()
    t0 = time.perf_counter()
    if name == "ort-fp32":
        eng = engines.load_vae_engine("onnxruntime", job["onnx"], which, threads=threads)
        run = lambda: eng(feed)  # noqa: E731
    else:
        eng = engines.load_vae_engine("torch-fp32", ck, which, threads=threads)
        if name == "torch-bf16":
            # Outside the export policy (the VAE stays fp32, thfm_serve/contract/specs.py): timed to show what it
            # would buy, with its error against fp32 in the table.
            module = eng.module.to(torch.bfloat16)
            args = [torch.from_numpy(feed[n]).to(torch.bfloat16) for n in eng.input_names]

            def run():
                with torch.inference_mode():
                    return {eng.output_names[0]: module(*args).float().numpy()}
        else:
            run = lambda: eng(feed)  # noqa: E731
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    times, out = time_calls(run, job["runs"], job["warmup"])
    res = {"times_s": times, "median_s": statistics.median(times), "load_s": load_s, "rss_before_load_mb": rss0,
           "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(), "threads": threads}
    ref_path = Path(job["workdir"]) / f"ref_{which}_{job['shape_key']}.npz"
    if name == REFERENCE:
        np.savez(ref_path, **out)
    elif ref_path.is_file():
        res["accuracy"] = compare(out, dict(np.load(ref_path)), "bf16" if name == "torch-bf16" else "fp32", VAE_KINDS)
    return res


def _flatten_results(results: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{t}/{k}": np.asarray(v) for t, arrs in results.items() for k, v in arrs.items() if k != "joint_names"}


def e2e_compare(out: dict[str, np.ndarray], ref_path: Path) -> dict[str, Any] | None:
    if not ref_path.is_file():
        return None
    ref = dict(np.load(ref_path))
    diffs = {}
    for k, r in ref.items():
        if k in out and out[k].shape == r.shape:
            diffs[k] = float(np.max(np.abs(out[k].astype(np.float64) - r)))
        else:
            diffs[k] = None
    return {"max_abs": diffs}


def pipeline_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from engines import set_torch_threads
    from thfm_serve.pipeline import ThfmPipeline

    threads = set_torch_threads(job["threads"])
    frames, height, width = job["frames"], job["height"], job["width"]
    clip = clip_frames(frames, height, width)
    dtype = torch.bfloat16 if job["engine"].endswith("bf16") else torch.float32
    rss0 = rss_mb()
    t0 = time.perf_counter()
    pipe = ThfmPipeline.from_checkpoint(job["checkpoint"], dtype=dtype)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    run = lambda: _flatten_results(pipe.run(clip, list(job["tasks"]), height, width, frames))  # noqa: E731
    times, out = time_calls(run, job["runs"], job["warmup"])
    res = {"times_s": times, "median_s": statistics.median(times), "load_s": load_s, "rss_before_load_mb": rss0,
           "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(), "threads": threads}
    ref_path = Path(job["workdir"]) / f"ref_e2e_{job['shape_key']}.npz"
    if job["engine"] == "pipeline-fp32":
        np.savez(ref_path, **out)
    else:
        res["vs_pipeline_fp32"] = e2e_compare(out, ref_path)
    return res


def repo_inprocess_worker(job: dict[str, Any]) -> dict[str, Any]:
    """The served code path (serving.run_entry over the repository's onnxruntime models) without a server."""
    from thfm_serve import serving
    from engines import set_torch_threads
    from thfm_serve.contract.protocol import CORE, VAE_DECODER, VAE_ENCODER

    threads = set_torch_threads(job["threads"])
    repo = Path(job["repo"])
    frames, height, width = job["frames"], job["height"], job["width"]
    clip = clip_frames(frames, height, width)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    assets = serving.load_assets(repo)
    models = {m: serving.OnnxModel(assets.specs[m], serving.create_session(repo / m / "1" / "model.onnx", threads))
              for m in (VAE_ENCODER, CORE, VAE_DECODER)}
    cfg = assets.config
    embeddings = assets.embeddings()
    grid = serving.Grid(frames, height, width)
    call = serving.local_call(models)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    run = lambda: _flatten_results(serving.run_entry(clip, list(job["tasks"]), grid, cfg, embeddings, call))  # noqa: E731
    times, out = time_calls(run, job["runs"], job["warmup"])
    res = {"times_s": times, "median_s": statistics.median(times), "load_s": load_s, "rss_before_load_mb": rss0,
           "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(), "threads": threads}
    res["vs_pipeline_fp32"] = e2e_compare(out, Path(job["workdir"]) / f"ref_e2e_{job['shape_key']}.npz")
    return res


def _group_hwm_mb(pgid: int) -> dict[int, float]:
    """VmHWM (peak RSS) of every live process in a process group, in MB."""
    from thfm_serve.server import group_members

    out = {}
    for pid in group_members(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[pid] = int(line.split()[1]) / 1e3
        except OSError:
            continue
    return out


def served_worker(job: dict[str, Any]) -> dict[str, Any]:
    """tritonserver on the exported repository; the entry model over gRPC with the same clip/tasks."""
    import tritonclient.grpc as grpcclient

    from thfm_serve.contract import protocol
    from thfm_serve.server import ServerConfig, TritonServer, server_ports

    frames, height, width = job["frames"], job["height"], job["width"]
    clip = clip_frames(frames, height, width)
    cfg = ServerConfig(repo=Path(job["repo"]), **server_ports())
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    with TritonServer(cfg) as server:
        load_s = time.perf_counter() - t0
        # Given channel_args, tritonclient drops its own defaults, among them the unlimited message
        # sizes: without these a dense task's output (17x256x256 float32 = 4.5 MB) exceeds gRPC's 4 MB.
        client = grpcclient.InferenceServerClient(server.grpc_url, channel_args=[
            ("grpc.enable_http_proxy", 0), ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_receive_message_length", 2**31 - 1)])
        tasks = list(job["tasks"])
        inputs = [grpcclient.InferInput(protocol.INPUT_FRAMES, list(clip.shape), "UINT8"),
                  grpcclient.InferInput(protocol.INPUT_TASKS, [len(tasks)], "BYTES")]
        inputs[0].set_data_from_numpy(clip)
        inputs[1].set_data_from_numpy(np.array([t.encode() for t in tasks], dtype=np.object_))
        outputs = [grpcclient.InferRequestedOutput(protocol.OUTPUT_FOR_TASK[t]) for t in tasks]

        def run():
            r = client.infer(protocol.ENTRY_MODEL, inputs, outputs=outputs, client_timeout=3600)
            return {t: r.as_numpy(protocol.OUTPUT_FOR_TASK[t]) for t in tasks}

        times, out = time_calls(run, job["runs"], job["warmup"])
        hwm = _group_hwm_mb(server.pid)
        client.close()
        res.update({"times_s": times, "median_s": statistics.median(times), "load_s": load_s,
                    "peak_rss_mb": sum(hwm.values()), "processes": len(hwm), "threads": job["threads"]})
        if job.get("perf_analyzer"):
            res["perf_analyzer"] = _perf_analyzer_p50(server.grpc_url, job)
    from thfm_serve.contract.tasks import OUTPUT_KEYS

    flat = {f"{t}/{OUTPUT_KEYS[t]}": v for t, v in out.items()}
    res["vs_pipeline_fp32"] = e2e_compare(flat, Path(job["workdir"]) / f"ref_e2e_{job['shape_key']}.npz")
    return res


def _perf_analyzer_p50(url: str, job: dict[str, Any]) -> dict[str, Any]:
    """`thfm perf` at concurrency 1 (the mp4 input path) as a cross-check of the client timing."""
    from thfm_serve.errors import ThfmError
    from thfm_serve.perf import PerfOptions, run_perf

    out_dir = Path(job["workdir"]) / f"perf_analyzer_{job['shape_key']}"
    try:
        summary = run_perf(PerfOptions(url=url, out=out_dir, concurrency=(1,), request_count=max(2, job["runs"]),
                                       tasks=tuple(job["tasks"]), timeout_s=3600))
    except ThfmError as e:
        return {"error": str(e)}
    r = summary["results"][0]
    return {k: r.get(k) for k in ("throughput_infer_per_s", "p50_latency_ms", "p90_latency_ms", "p99_latency_ms", "error")}


def quantize_worker(job: dict[str, Any]) -> dict[str, Any]:
    """int8 Q/DQ core from the fp32 export by the exporter's quantize_core, with the recipe of one
    target (export.quantize.RECIPES):

    "cpu" (engine ort-int8): what `thfm export --target cpu --precision int8` writes, uint8
        asymmetric activations, linears only;
    "gpu" (engine ort-int8-trt): the TensorRT recipe (int8 symmetric activations) run in
        onnxruntime, for comparison; here with the linears only, like "cpu".

    Both are calibrated as the exporter calibrates the linears-only recipe (PyTorch forward hooks on
    the Linears): the TensorRT recipe's attention products need onnxruntime's calibrator, which runs
    out of memory on the 1.3B core on this machine. Calibration inputs are the exporter's:
    procedural clips, VAE-encoded, one row per task prompt.
    """
    import dataclasses

    import torch

    from thfm_serve.checkpoint import load_checkpoint
    from thfm_serve.export.calibration import clip_latent, procedural_clips, task_texts
    from thfm_serve.export.onnx_export import PROTOBUF_LIMIT, onnx_files
    from thfm_serve.export.precision import lowered_core
    from thfm_serve.export.quantize import quantize_core, recipe_for
    from thfm_serve.contract.specs import Precision

    torch.set_num_threads(job["threads"])
    src, dst = Path(job["onnx"]), Path(job["out"])
    frames, height, width = job["frames"], job["height"], job["width"]
    t0 = time.perf_counter()
    ck = load_checkpoint(job["checkpoint"], text_encoder=False)
    text = task_texts(ck)
    encoder = ck.vae_encoder()
    samples = []
    for clip in procedural_clips(job.get("clips", 1), frames, height, width, seed=0):
        latent = clip_latent(encoder, clip, frames, height, width)
        samples += [{"latent": latent, "text": text[i : i + 1]} for i in range(len(text))]
    del encoder
    recipe = dataclasses.replace(recipe_for(job["recipe"]), attention_products=False)
    for stale in onnx_files(dst):
        stale.unlink()
    info = quantize_core(src, dst, samples, recipe, module=lowered_core(ck.core(), Precision.FP32),
                         external_data=sum(p.stat().st_size for p in onnx_files(src)) > PROTOBUF_LIMIT * 0.9)
    return {"seconds": time.perf_counter() - t0, "stats": info, "excluded_nodes": info["excluded_nodes"],
            "samples": len(samples), "peak_rss_mb": peak_rss_mb()}


WORKERS = {"quantize": quantize_worker, "peak": peak_worker, "flops": flop_counter_worker, "core": core_worker, "vae": vae_worker,
           "pipeline": pipeline_worker, "repo-inprocess": repo_inprocess_worker, "served": served_worker}


def worker_main(job_path: str, result_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        res = WORKERS[job["worker"]](job)
        res["status"] = "ok"
    except Exception as e:  # a failing engine is reported in the table, not a crashed benchmark
        import traceback

        traceback.print_exc()
        res = {"status": "failed", "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
    Path(result_path).write_text(json.dumps(res))
    return 0


# =============================================================================================
# parent: orchestration
# =============================================================================================

class Bench:
    def __init__(self, args: argparse.Namespace, command: str):
        self.args = args
        self.command = command
        self.ck = Path(args.checkpoint).resolve()
        self.workdir = Path(args.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.shape_key = f"{args.frames}x{args.height}x{args.width}b{args.batch}"
        self.results: dict[str, Any] = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                        "machine": cpu_info(), "loadavg_start": loadavg(), "core": {}, "vae": {},
                                        "e2e": {}, "notes": []}

    # -- subprocesses
    def run_worker(self, job: dict[str, Any], label: str) -> dict[str, Any]:
        job = {**job, "checkpoint": str(self.ck), "workdir": str(self.workdir), "threads": self.args.threads,
               "frames": self.args.frames, "height": self.args.height, "width": self.args.width,
               "batch": self.args.batch, "runs": self.args.runs, "warmup": self.args.warmup,
               "shape_key": self.shape_key, "tasks": list(self.args.tasks)}
        with tempfile.TemporaryDirectory() as tmp:
            jp, rp = Path(tmp) / "job.json", Path(tmp) / "result.json"
            jp.write_text(json.dumps(job))
            env = dict(os.environ)
            # Every library's thread pool gets the same count (OpenMP for torch/oneDNN, MKL).
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(self.args.threads)
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            logger.info("%s ...", label)
            load0 = loadavg()
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(jp), str(rp)],
                                  env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=self.args.timeout_s)
            wall = time.perf_counter() - t0
            if rp.is_file():
                res = json.loads(rp.read_text())
            else:
                res = {"status": "failed", "error": f"worker exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] }"}
            if res.get("status") != "ok":
                logger.error("%s failed: %s\n%s", label, res.get("error"), proc.stderr[-3000:])
            res["wall_s"] = round(wall, 1)
            # Other processes on these 2 cores distort a timing: each row carries the load around it.
            res["loadavg"] = [load0, loadavg()]
        if "median_s" in res:
            logger.info("%s: median %.3f s (peak RSS %.0f MB)", label, res["median_s"], res.get("peak_rss_mb", 0))
        return res

    # -- stages
    def export(self) -> None:
        """fp32 repository (core + VAE + Triton configs) via the exporter; int8 cores quantised from its
        fp32 ONNX (quantize_worker)."""
        a = self.args
        self.repo_fp32 = self.workdir / f"repo_fp32_{self.shape_key}"
        # engine -> (export target whose int8 recipe it uses, file)
        self.int8 = {"ort-int8": ("cpu", self.workdir / f"int8_cpu_{self.shape_key}" / "model.onnx"),
                     "ort-int8-trt": ("gpu", self.workdir / f"int8_gpu_{self.shape_key}" / "model.onnx")}
        need_fp32 = any(e.startswith("ort") for e in a.core_engines) or "ort-fp32" in a.vae_engines or \
            any(p in a.e2e for p in ("repo-inprocess-fp32", "served-fp32"))
        if need_fp32:
            t0 = time.perf_counter()
            log = self.workdir / f"export_fp32_{self.shape_key}.log"
            code = (
                "import json, logging, sys\n"
                "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
                "from thfm_serve.export import export_repository\n"
                f"r = export_repository({str(self.ck)!r}, {str(self.repo_fp32)!r}, 'cpu', 'fp32', {a.frames}, {a.height}, "
                f"{a.width}, max_batch={max(a.batch, len(a.tasks))})\n"
                "print(json.dumps({k: v for k, v in r.items() if k != 'specs'}, default=str))\n"
            )
            logger.info("export fp32 repository %s (cached by manifest) ...", self.repo_fp32)
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
            with open(log, "w") as lf:
                proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                                      stderr=lf, text=True, timeout=a.timeout_s * 4)
            if proc.returncode != 0:
                raise SystemExit(f"export fp32 failed (see {log})")
            report = json.loads(proc.stdout.strip().splitlines()[-1])
            self.results["export_fp32"] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "models": {m: {k: v for k, v in r.items() if k in ("status", "validation", "runner")}
                           for m, r in report.get("models", {}).items()},
            }
        fp32_core = self.repo_fp32 / "core" / "1" / "model.onnx"
        for eng, (recipe, path) in self.int8.items():
            if eng not in a.core_engines:
                continue
            if path.is_file() and path.stat().st_mtime > fp32_core.stat().st_mtime:
                logger.info("int8 (%s recipe) %s is newer than the fp32 export: reused", recipe, path)
                continue
            res = self.run_worker({"worker": "quantize", "recipe": recipe, "onnx": str(fp32_core), "out": str(path),
                                   "clips": a.calibration_clips}, f"quantize int8 ({recipe} recipe)")
            self.results[f"quantize_{recipe}"] = res
            if res.get("status") != "ok":
                path.unlink(missing_ok=True)
                logger.error("int8 %s quantization failed: %s", recipe, res.get("error"))

    def run(self) -> dict[str, Any]:
        a = self.args
        r = self.results
        r["peak"] = self.run_worker({"worker": "peak", "matmul_size": a.matmul_size}, "matmul peak")
        r["flops_counter"] = self.run_worker({"worker": "flops"}, "flop counter (meta device)")
        tcfg = json.loads((self.ck / "transformer" / "config.json").read_text())
        thfm_cfg = json.loads((self.ck / "thfm" / "config.json").read_text())
        r["transformer_config"] = {k: tcfg[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "text_dim")}
        r["text_len"] = thfm_cfg["text_len"]
        r["flops"] = core_flops(tcfg, thfm_cfg["text_len"], a.frames, a.height, a.width, a.batch)
        r["flops_peer"] = core_flops(tcfg, thfm_cfg["text_len"], a.frames, a.height, a.width, a.batch, with_tokens=False)
        r["shape"] = {"frames": a.frames, "height": a.height, "width": a.width, "batch": a.batch,
                      "latent": [a.batch, LATENT_CHANNELS, latent_frames(a.frames), latent_size(a.height),
                                 latent_size(a.width)],
                      "tokens": r["flops"]["tokens"], "video_tokens": r["flops"]["video_tokens"]}
        self.export()

        # The reference runs first so every other engine can compare against it.
        order = sorted(a.core_engines, key=lambda e: (e != REFERENCE, CORE_ENGINES.index(e)))
        for eng in order:
            if eng == "tensorrt":
                r["core"][eng] = tensorrt_status()
                continue
            job = {"worker": "core", "engine": eng}
            if eng == "ort-fp32":
                job["onnx"] = str(self.repo_fp32 / "core" / "1" / "model.onnx")
            elif eng in self.int8:
                job["onnx"] = str(self.int8[eng][1])
            r["core"][eng] = self.run_worker(job, f"core {eng}")
        for which in ("vae_encoder", "vae_decoder"):
            r["vae"][which] = {}
            for eng in sorted(a.vae_engines, key=lambda e: (e != REFERENCE, VAE_ENGINES.index(e))):
                job = {"worker": "vae", "engine": eng, "which": which}
                if eng == "ort-fp32":
                    job["onnx"] = str(self.repo_fp32 / which / "1" / "model.onnx")
                r["vae"][which][eng] = self.run_worker(job, f"{which} {eng}")
        for path in sorted(a.e2e, key=E2E_PATHS.index):
            if path.startswith("pipeline"):
                job = {"worker": "pipeline", "engine": path}
            elif path == "repo-inprocess-fp32":
                job = {"worker": "repo-inprocess", "engine": path, "repo": str(self.repo_fp32)}
            else:
                job = {"worker": "served", "engine": path, "repo": str(self.repo_fp32), "perf_analyzer": a.perf_analyzer}
            r["e2e"][path] = self.run_worker(job, f"e2e {path}")
        r["loadavg_end"] = loadavg()
        r["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        return r


def tensorrt_status() -> dict[str, Any]:
    """TensorRT is timed only where it is importable and a GPU exists; otherwise it says why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return {"status": "not available", "error": "TensorRT is not installed on this machine (no GPU, and its "
                "wheels come from NVIDIA's index, unreachable here); build engines on a TensorRT host"}
    return {"status": "not available", "error": "tensorrt imports, but this benchmark times TensorRT only through the "
            "exporter's engine on a GPU host (export/engine.py); none was built here"}


# =============================================================================================
# report
# =============================================================================================

def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _load(res: dict[str, Any]) -> str:
    la = res.get("loadavg")
    return "-" if not la else f"{la[0]:.2f} -> {la[1]:.2f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _flop(x: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


def _gb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1e3:.2f} GB"


def _acc(res: dict[str, Any]) -> str:
    acc = res.get("accuracy")
    if not acc:
        return "reference" if res.get("_is_reference") else "-"
    parts = [f"{k} {v['max_abs']:.2g}" for k, v in acc["outputs"].items() if "max_abs" in v]
    return ("within tol: " if acc["ok"] else "**OUTSIDE tol**: ") + ", ".join(parts)


def targets(r: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(target, met?, evidence) for the issue's targets."""
    core = {k: v for k, v in r["core"].items() if v.get("status") == "ok"}
    out: list[tuple[str, bool | None, str]] = []
    peer = core.get(PEER)
    ours = {k: v for k, v in core.items() if k != PEER and (v.get("accuracy") or {}).get("ok", k == REFERENCE)}
    if peer and ours:
        best = min(ours, key=lambda k: ours[k]["median_s"])
        speed = peer["median_s"] / ours[best]["median_s"]
        out.append(("best CPU core >= 3x faster than the diffusers fp32 eager peer", speed >= 3.0,
                    f"{best}: {speed:.2f}x ({_fmt_s(ours[best]['median_s'])} vs {_fmt_s(peer['median_s'])})"))
        util = ours[best].get("utilisation")
        prec = PRECISION_OF[best]
        out.append((f"best CPU core >= 50% of the measured {prec} matmul peak", None if util is None else util >= 0.5,
                    "-" if util is None else f"{best}: {100 * util:.0f}% of {r['peak']['peak'][prec]:.0f} GFLOP/s "
                    "(every FLOP counted at that peak)"))
        mixed = ours[best].get("utilisation_mixed")
        if mixed is not None:
            out.append(("same, against the mixed int8/fp32 roofline of what the engine runs", mixed >= 0.5,
                        f"{best}: {100 * mixed:.0f}% (roofline {_fmt_s(ours[best]['roofline_s'])}: attention products "
                        "and input/output projections at the fp32 peak, the rest at the int8 peak)"))
    e2e = r["e2e"]
    served, pipe = e2e.get("served-fp32", {}), e2e.get("pipeline-fp32", {})
    if served.get("status") == "ok" and pipe.get("status") == "ok":
        ratio = served["median_s"] / pipe["median_s"]
        out.append(("served e2e within 15% of the in-process pipeline (fp32)", ratio <= 1.15,
                    f"served {_fmt_s(served['median_s'])} / pipeline {_fmt_s(pipe['median_s'])} = {ratio:.2f}"))
    inproc = e2e.get("repo-inprocess-fp32", {})
    if served.get("status") == "ok" and inproc.get("status") == "ok":
        ratio = served["median_s"] / inproc["median_s"]
        out.append(("served e2e within 15% of the same engines in-process (server overhead)", ratio <= 1.15,
                    f"served {_fmt_s(served['median_s'])} / in-process {_fmt_s(inproc['median_s'])} = {ratio:.2f}"))
    return out


def annotate(r: dict[str, Any]) -> None:
    """Derived numbers: throughput, FLOP/s, utilisation, speedup vs the peer."""
    frames_per_fwd = r["shape"]["frames"] * r["shape"]["batch"]
    peak = r["peak"].get("peak", {}) if r["peak"].get("status") == "ok" else {}
    peer = r["core"].get(PEER, {})
    for name, res in r["core"].items():
        if res.get("status") != "ok":
            continue
        res["_is_reference"] = name == REFERENCE
        flops = r["flops_peer" if name == PEER else "flops"]["total"]
        res["frames_per_s"] = frames_per_fwd / res["median_s"]
        res["gflops_per_s"] = flops / res["median_s"] / 1e9
        p = peak.get(PRECISION_OF[name])
        res["utilisation"] = res["gflops_per_s"] / p if p else None
        if name in MIXED_INT8 and peak.get("int8") and peak.get("fp32"):
            fp32_part = sum(r["flops"].get(k, 0.0) for k in FP32_IN_MIXED)
            ideal_s = (flops - fp32_part) / (peak["int8"] * 1e9) + fp32_part / (peak["fp32"] * 1e9)
            res["roofline_s"] = ideal_s
            res["utilisation_mixed"] = ideal_s / res["median_s"]
        if peer.get("status") == "ok":
            res["speedup_vs_peer"] = peer["median_s"] / res["median_s"]
    for which, engines_ in r["vae"].items():
        for name, res in engines_.items():
            if res.get("status") == "ok":
                res["_is_reference"] = name == REFERENCE
                res["frames_per_s"] = r["shape"]["frames"] / res["median_s"]
    for name, res in r["e2e"].items():
        if res.get("status") == "ok":
            res["frames_per_s"] = r["shape"]["frames"] / res["median_s"]


def machine_class(m: dict[str, Any]) -> str:
    """The class of a results file's machine; results written before the class was recorded have the
    ISA flags only."""
    if m.get("class"):
        return m["class"]
    from thfm_serve.machine import CpuFeatures

    return CpuFeatures(m.get("model", ""), "", frozenset(k for k, v in m.get("isa", {}).items() if v)).machine_class


def markdown(r: dict[str, Any], png_name: str) -> str:
    s, m = r["shape"], r["machine"]
    cls = f" [{machine_class(m)}]"  # every table says which machine class it is from
    lines = [f"# THFM CPU benchmark: {r['name']} ({r['checkpoint_name']}), {s['frames']} frames {s['height']}x{s['width']}, batch {s['batch']}", ""]
    lines += ["Command:", "", "```", r["command"], "```", ""]
    isa = ", ".join(k for k, v in m["isa"].items() if v) or "-"
    amx = "AMX present" if (m["isa"].get("amx_bf16") or m["isa"].get("amx_int8")) else "no AMX"
    lines += [f"Machine class: {machine_class(m)}. Machine: {m['model']}, {m['cores']} cores ({isa}; {amx}), {m['mem_gb']} GiB. "
              f"Threads: {r['threads']}. Runs: median of {r['runs']} after {r['warmup']} warm-up. "
              f"Started {r['started']}, 1-min load {r['loadavg_start']:.2f} at start, {r.get('loadavg_end', 0):.2f} at end."]
    if r.get("quiet_note"):
        lines += ["", r["quiet_note"]]
    lines += ["", f"Core input: latent {s['latent']}, text [{s['batch']}, {r['text_len']}, {r['transformer_config']['text_dim']}] "
              f"({s['video_tokens']} video tokens + {s['frames']} THFM frame tokens = {s['tokens']} tokens; the peer has no "
              f"frame tokens). Transformer: {r['transformer_config']}.", ""]

    # FLOPs
    f, fc = r["flops"], r.get("flops_counter", {})
    lines += ["## FLOPs per core forward" + cls, "",
              "| | analytic | torch FlopCounterMode (meta) | ratio |", "|---|---:|---:|---:|"]
    for label, ana, key in (("THFM core", f["total"], "core"), ("diffusers peer", r["flops_peer"]["total"], "peer")):
        cnt = fc.get(key)
        lines.append(f"| {label} | {_flop(ana)} | {'-' if cnt is None else _flop(cnt)} | "
                     f"{'-' if not cnt else f'{cnt / ana:.3f}'} |")
    for key in ("vae_encoder", "vae_decoder"):
        if fc.get(key):
            lines.append(f"| {key} | - | {_flop(fc[key])} | - |")
    parts = ", ".join(f"{k} {_flop(v)}" for k, v in f.items() if k not in ("total", "tokens", "video_tokens"))
    lines += ["", f"Analytic breakdown: {parts}.", ""]

    # peak
    pk = r["peak"]
    if pk.get("status") == "ok":
        isa = ", ".join(k for k, v in pk.get("isa", m["isa"]).items() if v) or "-"
        lines += [f"## Matmul peak on this machine ({pk['size']}x{pk['size']} matmuls, {pk['threads']} threads, same run){cls}", "",
                  f"Instruction sets: {isa}.", "",
                  "| precision | backend | GFLOP/s |", "|---|---|---:|"]
        for prec, backends in pk["gflops"].items():
            for b, v in backends.items():
                star = " (peak)" if v == pk["peak"][prec] else ""
                at = pk.get("probe_only", {}).get(f"{prec} {b}")
                lines.append(f"| {prec} | {b} | {v:.3g}{star}{f', at {at}' if at else ''} |")
        lines.append("")

    # core
    lines += ["## Core (transformer + THFM tokens/heads), one forward" + cls, "",
              "| engine | precision | median | frames/s | speedup vs peer | GFLOP/s | % of peak (prec) | % of mixed roofline | peak RSS | load time | 1-min load avg | accuracy vs torch fp32 (max abs) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, res in r["core"].items():
        if res.get("status") != "ok":
            lines.append(f"| {name} | {PRECISION_OF[name]} | {res.get('status', 'failed')}: {res.get('error', '')} | | | | | | | | | |")
            continue
        util, mixed = res.get("utilisation"), res.get("utilisation_mixed")
        lines.append(
            f"| {name}{' (peer)' if name == PEER else ''} | {PRECISION_OF[name]} | {_fmt_s(res['median_s'])} | "
            f"{res['frames_per_s']:.2f} | {_x(res.get('speedup_vs_peer'))} | {res['gflops_per_s']:.0f} | "
            f"{'-' if util is None else f'{100 * util:.0f}%'} | {'-' if mixed is None else f'{100 * mixed:.0f}%'} | "
            f"{_gb(res['peak_rss_mb'])} | {res['load_s']:.1f} s | {_load(res)} | "
            f"{'n/a (no THFM tokens)' if name == PEER else _acc(res)} |")
    lines.append("")

    # vae
    lines += ["## VAE (one window, batch 1)" + cls, "",
              "| part | engine | median | frames/s | peak RSS | 1-min load avg | accuracy vs torch fp32 (max abs) |", "|---|---|---:|---:|---:|---:|---|"]
    for which, engines_ in r["vae"].items():
        for name, res in engines_.items():
            if res.get("status") != "ok":
                lines.append(f"| {which} | {name} | {res.get('status')}: {res.get('error', '')} | | | | |")
                continue
            note = " (outside policy: VAE is fp32)" if name == "torch-bf16" else ""
            lines.append(f"| {which} | {name} | {_fmt_s(res['median_s'])} | {res['frames_per_s']:.2f} | "
                         f"{_gb(res['peak_rss_mb'])} | {_load(res)} | {_acc(res)}{note} |")
    lines.append("")

    # e2e
    lines += [f"## End to end (one {s['frames']}-frame clip at {s['height']}x{s['width']}, tasks {','.join(r['tasks'])}){cls}", "",
              "| path | precision | median | frames/s | peak RSS | 1-min load avg | vs pipeline-fp32 outputs (max abs) |", "|---|---|---:|---:|---:|---:|---|"]
    for name, res in r["e2e"].items():
        if res.get("status") != "ok":
            lines.append(f"| {name} | {PRECISION_OF[name]} | {res.get('status')}: {res.get('error', '')} | | | | |")
            continue
        cmp_ = res.get("vs_pipeline_fp32") or {}
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in (cmp_.get("max_abs") or {}).items() if v is not None) or \
            ("reference" if name == "pipeline-fp32" else "-")
        rss = _gb(res["peak_rss_mb"]) + (f" ({res['processes']} processes)" if "processes" in res else "")
        lines.append(f"| {name} | {PRECISION_OF[name]} | {_fmt_s(res['median_s'])} | {res['frames_per_s']:.2f} | {rss} | {_load(res)} | {diffs} |")
        pa = res.get("perf_analyzer")
        if pa and pa.get("p50_latency_ms") is not None:
            lines.append(f"| {name} via perf_analyzer (mp4 input, c=1) | {PRECISION_OF[name]} | "
                         f"{_fmt_s(pa['p50_latency_ms'] / 1e3)} (p50) | - | - | | p99 {_fmt_s(pa['p99_latency_ms'] / 1e3)} |")
    lines.append("")

    # targets
    lines += ["## Targets" + cls, "", "| target | met | evidence |", "|---|---|---|"]
    for name, met, ev in targets(r):
        lines.append(f"| {name} | {'-' if met is None else ('yes' if met else 'NO')} | {ev} |")
    lines.append("")
    if "export_fp32" in r:
        lines += [f"Export (fp32, export_repository): {r['export_fp32']['seconds']} s; " +
                  "; ".join(f"{m}: {v.get('status')}" for m, v in r["export_fp32"]["models"].items()), ""]
    for recipe in ("cpu", "gpu"):
        q = r.get(f"quantize_{recipe}")
        if q and q.get("status") == "ok":
            st = q["stats"]
            lines += [f"int8 ({recipe} recipe): {st.get('quantized_matmuls')} of {st.get('matmuls')} MatMuls quantized, "
                      f"{q['samples']} calibration samples, {q['seconds']:.0f} s.", ""]
    if r["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in r["notes"]] + [""]
    lines += [f"Plot: {png_name}. Raw numbers: {Path(png_name).with_suffix('.json').name}.", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("core", {k: v for k, v in r["core"].items()}),
              ("VAE encoder", r["vae"].get("vae_encoder", {})),
              ("VAE decoder", r["vae"].get("vae_decoder", {})),
              ("end to end", r["e2e"])]
    fig, axes = plt.subplots(1, 4, figsize=(18, 5.2))
    for ax, (title, items) in zip(axes, groups):
        names = [k for k, v in items.items() if v.get("status") == "ok"]
        vals = [items[k]["median_s"] for k in names]
        colors = ["#999999" if k == PEER else ("#1f77b4" if "fp32" in k else ("#2ca02c" if "bf16" in k else "#d62728"))
                  for k in names]
        bars = ax.barh(names, vals, color=colors)
        for b, k, v in zip(bars, names, vals):
            extra = f"  {items[k]['speedup_vs_peer']:.1f}x" if "speedup_vs_peer" in items[k] else ""
            ax.text(v, b.get_y() + b.get_height() / 2, f" {_fmt_s(v)}{extra}", va="center", fontsize=8)
        missing = [k for k, v in items.items() if v.get("status") != "ok"]
        if missing:
            ax.set_xlabel("median latency (s); not timed: " + ", ".join(missing), fontsize=8)
        else:
            ax.set_xlabel("median latency (s)")
        ax.set_title(title)
        ax.invert_yaxis()
        if vals:
            ax.set_xlim(0, max(vals) * 1.45)
    s = r["shape"]
    fig.suptitle(f"THFM on CPU ({r['machine']['model']}, {r['threads']} threads): {r['name']}, "
                 f"{s['frames']} frames {s['height']}x{s['width']}", fontsize=11)
    import textwrap

    cmd = textwrap.wrap(r["command"], 200, break_long_words=True)
    fig.text(0.01, 0.01, "\n".join(cmd), fontsize=7, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.02 + 0.025 * len(cmd), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =============================================================================================
# CLI
# =============================================================================================

def wait_for_quiet(threshold: float, max_wait_s: float, poll_s: float = 60.0) -> str:
    """Poll the 1-minute load until it is below `threshold` (other work on 2 cores skews timings)."""
    t0 = time.monotonic()
    while True:
        load = loadavg()
        if load < threshold:
            return f"Machine quiet at start (1-min load {load:.2f} < {threshold} after {time.monotonic() - t0:.0f} s of waiting)."
        if time.monotonic() - t0 >= max_wait_s:
            return (f"**The machine never got quiet**: 1-min load was {load:.2f} (>= {threshold}) after waiting "
                    f"{max_wait_s / 60:.0f} min, so the benchmark ran anyway; other processes shared the cores and "
                    "the timings are pessimistic.")
        logger.info("1-min load %.2f >= %.2f: waiting (%.0f s so far)", load, threshold, time.monotonic() - t0)
        time.sleep(poll_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="THFM checkpoint directory")
    p.add_argument("--frames", type=int, default=17, help="clip frames, 4n+1 (default 17)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="core batch rows (one per task when served; default 1)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="tasks for the end-to-end paths")
    p.add_argument("--runs", type=int, default=5, help="timed runs per engine (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--core-engines", default=",".join(DEFAULT_CORE_ENGINES), help=f"subset of {','.join(CORE_ENGINES)}")
    p.add_argument("--vae-engines", default=",".join(VAE_ENGINES), help=f"subset of {','.join(VAE_ENGINES)} ('' for none)")
    p.add_argument("--e2e", default=",".join(E2E_PATHS), help=f"subset of {','.join(E2E_PATHS)} ('' for none)")
    p.add_argument("--perf-analyzer", action="store_true", help="also run `thfm perf` (perf_analyzer) on the served path")
    p.add_argument("--calibration-clips", type=int, default=1, help="int8 calibration clips for the exporter (default 1)")
    p.add_argument("--matmul-size", type=int, default=3072, help="square matmul size for the peak measurement")
    p.add_argument("--workdir", default=None, help="exports and reference outputs (default runs/bench/<name>)")
    p.add_argument("--out", default=str(ROOT / "perf" / "results"), help="where the .md/.png/.json go")
    p.add_argument("--name", default=None, help="result file name (default <preset>_<F>x<H>x<W>)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="LOAD",
                   help="before starting, wait until the 1-min load is below LOAD (0: do not wait)")
    p.add_argument("--wait-max-min", type=float, default=40.0, help="give up waiting after this many minutes")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="limit per engine subprocess")
    args = p.parse_args(argv)

    def subset(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad:
            p.error(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
        return items

    args.core_engines = subset(args.core_engines, CORE_ENGINES, "core engines")
    args.vae_engines = subset(args.vae_engines, VAE_ENGINES, "VAE engines")
    args.e2e = subset(args.e2e, E2E_PATHS, "e2e paths")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    ck = Path(args.checkpoint)
    try:
        preset = json.loads((ck / "thfm" / "config.json").read_text()).get("preset", ck.name)
    except (OSError, ValueError):
        p.error(f"{ck} is not a THFM checkpoint (no thfm/config.json)")
    args.name = args.name or f"{preset}_{args.frames}x{args.height}x{args.width}"
    args.workdir = args.workdir or str(ROOT / "runs" / "bench" / args.name)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1], argv[2])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if argv[:1] == ["--report"]:
        return report_main(argv[1:])
    args = parse_args(argv)
    command = "cd " + str(ROOT) + " && .venv/bin/python perf/bench_core.py " + shlex.join(argv)
    quiet_note = wait_for_quiet(args.wait_quiet, args.wait_max_min * 60) if args.wait_quiet > 0 else None
    bench = Bench(args, command)
    r = bench.results
    r.update({"name": args.name, "checkpoint_name": str(Path(args.checkpoint)), "threads": args.threads, "runs": args.runs,
              "warmup": args.warmup, "tasks": args.tasks, "quiet_note": quiet_note})
    bench.run()
    annotate(r)
    if not (r["machine"]["isa"].get("amx_bf16") or r["machine"]["isa"].get("amx_int8")):
        r["notes"].append("This CPU has no AMX: bf16 matmuls run on AVX512-BF16 (vdpbf16ps) and int8 on AVX512-VNNI "
                          "(vpdpbusd); torch fp32 matmuls go through MKL, onnxruntime's through MLAS.")
    write_outputs(r, Path(args.out), args.name)
    return 0


def write_outputs(r: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md, png, js = out / f"{name}.md", out / f"{name}.png", out / f"{name}.json"
    js.write_text(json.dumps(r, indent=1, default=str) + "\n")
    plot(r, png)
    md.write_text(markdown(r, png.name))
    logger.info("wrote %s, %s, %s", md, png, js)
    for target, met, ev in targets(r):
        logger.info("target %s: %s (%s)", target, "-" if met is None else ("met" if met else "NOT met"), ev)


def report_main(argv: list[str]) -> int:
    """`bench_core.py --report RESULT.json`: recompute the derived numbers of a finished run and rewrite
    its .md/.png/.json next to it (the timings and the command are the run's own)."""
    if len(argv) != 1 or not Path(argv[0]).is_file():
        raise SystemExit("usage: bench_core.py --report perf/results/<name>.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    path = Path(argv[0])
    r = json.loads(path.read_text())
    annotate(r)
    write_outputs(r, path.parent, path.stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
