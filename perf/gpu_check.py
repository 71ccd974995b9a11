"""The prepared GPU check (run by scripts/gpu-check.sh): one go, under 10 minutes on one NVIDIA GPU.

1. PyTorch bf16 core (the exported module: bf16 with its fp32 islands) of the wan2.1-1.3b shape at
   81 frames 480x832 (32,760 video tokens + 81 frame tokens), random weights made on the GPU (no
   checkpoint written): median latency of one forward, compared with GenCeption's published 0.96 s
   transformer forward on one TPU v6e (model-recipe.md), and peak GPU memory.
2. Where TensorRT >= 10 imports: ``thfm export --target gpu`` of a tiny random checkpoint (bf16):
   ONNX, engine build and the plan validation against PyTorch (fatal), the attention-fusion report.
3. Where a ``tritonserver`` binary with the TensorRT backend is on PATH (NVIDIA's Triton image with
   thfm-serve installed): that repository served, one request through the gRPC client, its depth
   and keypoints compared with the in-process pipeline.

Results go to perf/results/gpu/gpu_check_<time>.json and a .md summary; a step that cannot run
says why in its entry, nothing is estimated. ``--dry-run`` runs step 1 on the CPU at the tiny shape
(the tests use it to check the script up to the GPU boundary); its figures are not GPU results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

logger = logging.getLogger("gpu_check")

ROOT = Path(__file__).resolve().parents[1]
GENCEPTION_DIT_S = 0.96  # GenCeption (arXiv 2607.09024): 1.3B transformer forward, 81x480x832, one TPU v6e
DRY_SHAPE = (5, 32, 48)


def machine() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   cuda=torch.version.cuda, gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                               capture_output=True, text=True, timeout=30).stdout.strip()
        except (subprocess.SubprocessError, OSError) as e:
            out["nvidia_smi"] = f"failed: {e}"
    try:
        with open("/proc/cpuinfo") as f:
            out["cpu_flags_line"] = next((line.strip()[:200] + "..." for line in f if line.startswith("flags")), None)
    except OSError:
        pass
    for var in ("TRT_VERSION", "NVIDIA_TRITON_SERVER_VERSION", "NVIDIA_TENSORRT_VERSION"):
        if os.environ.get(var):
            out[var] = os.environ[var]
    return out


def core_bf16(preset: str, frames: int, height: int, width: int, runs: int, device: str) -> dict[str, Any]:
    """Median latency of the bf16 core forward (batch 1: one task) on `device`."""
    import torch
    from diffusers import WanTransformer3DModel

    from thfm_serve.config import PRESETS, ThfmConfig
    from thfm_serve.export.precision import lowered_core
    from thfm_serve.contract.geometry import latent_size
    from thfm_serve.contract.specs import Precision, base_dims_for
    from thfm_serve.model import ThfmCore, ThfmHeads

    p = PRESETS[preset]
    cfg = ThfmConfig(preset=preset, **p.thfm).validate()
    dims = base_dims_for(frames, height, width)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        transformer = WanTransformer3DModel(**p.transformer)
        dim = p.transformer["num_attention_heads"] * p.transformer["attention_head_dim"]
        core = ThfmCore(transformer, ThfmHeads(dim, cfg), cfg.root_joint).eval()
    module = lowered_core(core, Precision.BF16).to(device)  # bf16 with the exporter's fp32 islands
    del core, transformer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - t0
    latent = torch.randn(1, p.transformer["in_channels"], dims["latent_frames"], latent_size(height), latent_size(width),
                         device=device)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device) * 0.1
    tokens = dims["latent_frames"] * dims["hp"] * dims["wp"]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times = []
    with torch.inference_mode():
        for i in range(2 + runs):  # two warm-up forwards (kernel selection, allocator)
            sync()
            t = time.perf_counter()
            out = module(latent, text)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t)
    finite = all(bool(torch.isfinite(o).all()) for o in out)
    median = statistics.median(times)
    result = {"preset": preset, "shape": {"frames": frames, "height": height, "width": width},
              "video_tokens": tokens, "frame_tokens": frames, "device": device, "dtype": "bf16 (+fp32 islands)",
              "runs": runs, "median_s": round(median, 4), "min_s": round(min(times), 4), "max_s": round(max(times), 4),
              "build_s": round(build_s, 1), "outputs_finite": finite,
              "genception_tpu_v6e_s": GENCEPTION_DIT_S,
              # Only the real shape on a GPU compares with the published figure.
              "vs_genception": round(GENCEPTION_DIT_S / median, 3) if device.startswith("cuda") else None}
    if device.startswith("cuda"):
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def tensorrt_path(work: Path, timeout_s: float) -> dict[str, Any]:
    """Tiny checkpoint -> gpu repository with a TensorRT plan (validated), then one Triton request."""
    try:
        from thfm_serve.export.engine import import_tensorrt

        trt = import_tensorrt()
    except Exception as e:  # ExportError: missing or too old
        return {"status": f"skipped: {e}"}
    from thfm_serve.checkpoint import init_checkpoint
    from thfm_serve.export import export_repository

    out: dict[str, Any] = {"tensorrt": str(trt.__version__)}
    ck = init_checkpoint("tiny", work / "ck", seed=0)
    repo = work / "model_repository"
    t0 = time.perf_counter()
    report = export_repository(ck, repo, "gpu", "bf16", frames=9, height=64, width=64, force=True)
    out["export_s"] = round(time.perf_counter() - t0, 1)
    out["engine"] = report.get("engine")
    out["status"] = "built and validated"
    out["triton"] = triton_request(repo, ck, timeout_s)
    return out


def triton_request(repo: Path, ck: Path, timeout_s: float) -> dict[str, Any]:
    exe = shutil.which("tritonserver")
    if exe is None:
        return {"status": "skipped: no tritonserver on PATH (run inside the Triton image, model_repository/README.md)"}
    import numpy as np

    from thfm_serve.client import ThfmClient
    from thfm_serve.export.calibration import procedural_clips
    from thfm_serve.contract.specs import tolerance_for
    from thfm_serve.pipeline import ThfmPipeline
    from thfm_serve.repository import check_repository
    from thfm_serve.server import free_ports

    check_repository(repo, "gpu")  # includes the plan's TensorRT version against this image's
    http, grpc, metrics = free_ports(3)
    log = repo.parent / "tritonserver.log"
    cmd = [exe, f"--model-repository={repo}", f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    try:
        url = f"127.0.0.1:{grpc}"
        deadline = time.time() + timeout_s
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        while time.time() < deadline:
            if proc.poll() is not None:
                return {"status": f"tritonserver exited with {proc.returncode}", "log_tail": log.read_text()[-3000:]}
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            time.sleep(1)
        else:
            return {"status": f"not ready within {timeout_s:.0f} s", "log_tail": log.read_text()[-3000:]}
        clip = procedural_clips(1, 9, 64, 64, seed=7)[0]
        tasks = ["depth", "keypoints2d"]
        t = time.perf_counter()
        with ThfmClient(url) as c:
            got, _ = c.infer(tasks, frames=clip)  # {task: array}, joint names
        latency = time.perf_counter() - t
        ref = ThfmPipeline.from_checkpoint(ck).run(clip, tasks)
        diffs = {task: float(np.abs(np.asarray(got[task]) - ref[task][key]).max())
                 for task, key in (("depth", "depth"), ("keypoints2d", "keypoints"))}
        tol = tolerance_for("bf16", "maps").atol
        return {"status": "served", "request_s": round(latency, 3), "max_abs_vs_pipeline": diffs,
                "within_bf16_maps_atol": diffs["depth"] <= tol}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ratio(value: float | None) -> str:
    return "n/a (not the GPU shape)" if value is None else f"{value:.2f}x"


def render(result: dict[str, Any]) -> str:
    core = result.get("core_bf16", {})
    lines = [f"# GPU check {result['started']}", "", f"Command: `{result['command']}`", "",
             f"Machine: {json.dumps(result['machine'])}", ""]
    if "median_s" in core:
        lines += ["| core (PyTorch bf16) | shape | tokens | median | vs GenCeption TPU v6e 0.96 s | peak GPU memory |",
                  "|---|---|---:|---:|---:|---:|",
                  f"| {core['preset']} on {core['device']} | {core['shape']['frames']}x{core['shape']['height']}x"
                  f"{core['shape']['width']} | {core['video_tokens'] + core['frame_tokens']:,} | {core['median_s']:.3f} s | "
                  f"{_ratio(core['vs_genception'])} | {core.get('peak_memory_gb', 'n/a')} GB |", ""]
    else:
        lines += [f"core: {core}", ""]
    lines += ["TensorRT and Triton:", "", "```", json.dumps(result.get("tensorrt"), indent=1), "```"]
    if result.get("dry_run"):
        lines += ["", "**Dry run on the CPU at the tiny shape: these are not GPU figures.**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "perf" / "results" / "gpu"), help="results folder")
    ap.add_argument("--runs", type=int, default=5, help="timed core forwards (after two warm-ups)")
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--skip-tensorrt", action="store_true", help="only the PyTorch core")
    ap.add_argument("--server-timeout", type=float, default=180.0)
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny preset at 5x32x48, 2 runs: checks the script itself, no GPU figures")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch

    if args.dry_run:
        device, preset, (frames, height, width), runs = "cpu", "tiny", DRY_SHAPE, 2
    else:
        if not torch.cuda.is_available():
            logger.error("no CUDA device visible to torch (install a CUDA build of torch, or use --dry-run)")
            return 2
        device, preset, frames, height, width, runs = "cuda", args.preset, args.frames, args.height, args.width, args.runs
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result: dict[str, Any] = {"started": stamp, "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                              "dry_run": args.dry_run, "machine": machine()}
    t0 = time.perf_counter()
    try:
        result["core_bf16"] = core_bf16(preset, frames, height, width, runs, device)
        logger.info("core bf16 %s: median %.3f s (GenCeption TPU v6e: %.2f s)", preset, result["core_bf16"]["median_s"],
                    GENCEPTION_DIT_S)
    except Exception as e:  # record and go on: the TensorRT step is independent
        result["core_bf16"] = {"status": f"failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    if device == "cuda":
        torch.cuda.empty_cache()
    if args.skip_tensorrt:
        result["tensorrt"] = {"status": "skipped: --skip-tensorrt"}
    else:
        with tempfile.TemporaryDirectory(prefix="thfm-gpu-check-") as work:
            try:
                result["tensorrt"] = tensorrt_path(Path(work), args.server_timeout)
            except Exception as e:
                result["tensorrt"] = {"status": f"failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    name = f"gpu_check_{stamp}{'_dry' if args.dry_run else ''}"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(render(result))
    logger.info("results: %s.{json,md}", out_dir / name)
    failed = [k for k in ("core_bf16", "tensorrt") if str(result[k].get("status", "")).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
