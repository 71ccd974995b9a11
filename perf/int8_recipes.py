"""Which int8 Q/DQ recipe runs fastest in onnxruntime on this CPU: a slice of the core, every recipe.

    .venv/bin/python perf/int8_recipes.py --checkpoint runs/ck13 --layers 4 --frames 17 --height 256 --width 256

The exporter picks the int8 recipe by target (export/quantize.py RECIPES). This measures the choice:
the first --layers transformer blocks of a checkpoint's core (full width: the 1.3B-shaped core's
matmuls and attention at the benchmark shape, without an hour of export and calibration) exported to
fp32 ONNX, quantised with onnxruntime's own calibrator by

  cpu            the CPU recipe: uint8 asymmetric activations, linears only;
  cpu+attention  the same, plus attention's QK^T and PV products (adds QLinearSoftmax);
  gpu            the TensorRT recipe: int8 symmetric activations, linears and attention products;
  cpu+7bit       the CPU recipe with 7-bit weights (onnxruntime's reduce_range);
  cpu+u8u8       the CPU recipe with uint8 weights;

and each timed in onnxruntime (the serving session options) against the fp32 slice. The report also
counts, after onnxruntime's graph optimisation, the fused QLinearMatMul nodes and the MatMuls left
in float (a DequantizeLinear on a weight feeding a float MatMul costs a weight dequantisation per
call). Output: perf/results/int8_recipes_<name>.md and .json with the command that made them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "perf") not in sys.path:  # the benchmark helpers (perf/engines.py) are not a package
    sys.path.insert(0, str(ROOT / "perf"))
from engines import time_onnx  # noqa: E402
logger = logging.getLogger("int8_recipes")


def variants() -> dict[str, Any]:
    from thfm_serve.export.quantize import RECIPES

    cpu = RECIPES["cpu"]
    # Without VNNI (AVX2 only) onnxruntime's u8 x s8 GEMM sums pairs of products in int16 with
    # saturation (vpmaddubsw); 7-bit weights or u8 x u8 avoid it, which the last two rows measure.
    return {"cpu": cpu, "cpu+attention": dataclasses.replace(cpu, name=cpu.name + "+attention", attention_products=True),
            "gpu": RECIPES["gpu"],
            "cpu+7bit": dataclasses.replace(cpu, name=cpu.name + "+reduce_range", reduce_range=True),
            "cpu+u8u8": dataclasses.replace(cpu, name=cpu.name + "+u8u8", weights="uint8")}


def optimized_ops(path: Path, threads: int) -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (ORT_ENABLE_ALL, written back out)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        model = onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--layers", type=int, default=4, help="transformer blocks kept (from the first)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "perf" / "results"))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "int8_recipes"))
    p.add_argument("--name", help="result file stem (default int8_recipes_<checkpoint>_<L>l_<F>x<H>x<W>)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = "cd " + shlex.quote(str(ROOT)) + " && .venv/bin/python perf/int8_recipes.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    import torch

    from thfm_serve.checkpoint import load_checkpoint
    from thfm_serve.export.calibration import clip_latent, procedural_clips, task_texts
    from thfm_serve.export.onnx_export import export_onnx
    from thfm_serve.export.precision import lowered_core
    from thfm_serve.export.quantize import qdq_stats, quantize_core
    from thfm_serve.contract.specs import Precision, build_specs
    from thfm_serve.contract.protocol import CORE

    torch.set_num_threads(args.threads)
    work = Path(args.workdir) / f"{Path(args.checkpoint).name}_{args.layers}l_{args.frames}x{args.height}x{args.width}"
    work.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(args.checkpoint, text_encoder=False)
    core = ck.core()
    total_layers = len(core.transformer.blocks)
    if not 0 < args.layers <= total_layers:
        raise SystemExit(f"--layers must be in 1..{total_layers}")
    core.transformer.blocks = core.transformer.blocks[: args.layers]
    spec = build_specs(ck.config, args.frames, args.height, args.width, precision=Precision.FP32)[CORE]

    # Calibration and timing inputs as the exporter makes them: a procedural clip through the VAE,
    # one row per task prompt for calibration; one task row for timing (batch 1, as the benchmark).
    text = task_texts(ck)
    clip = procedural_clips(1, args.frames, args.height, args.width, seed=0)[0]
    latent = clip_latent(ck.vae_encoder(), clip, args.frames, args.height, args.width)
    samples = [{"latent": latent, "text": text[i : i + 1]} for i in range(len(text))]
    feed = {"latent": latent, "text": text[:1]}

    fp32_path = work / "fp32" / "model.onnx"
    if not fp32_path.is_file():
        logger.info("exporting %d of %d blocks to %s", args.layers, total_layers, fp32_path)
        export_onnx(lowered_core(core, Precision.FP32), spec, fp32_path)
    del core, ck

    rows: dict[str, dict[str, Any]] = {}
    logger.info("timing fp32")
    ref = time_onnx(fp32_path, feed, args.threads, args.runs, args.warmup)
    rows["fp32"] = {"median_s": ref["median_s"], "times_s": ref["times_s"], "ops": optimized_ops(fp32_path, args.threads)}
    for name, recipe in variants().items():
        path = work / name / "model.onnx"
        if not path.is_file():
            logger.info("quantising with %s", recipe.describe())
            quantize_core(fp32_path, path, samples, recipe)
        res = time_onnx(path, feed, args.threads, args.runs, args.warmup)
        diff = {k: float(np.abs(v.astype(np.float32) - ref["outputs"][k]).max()) for k, v in res["outputs"].items()}
        rows[name] = {"median_s": res["median_s"], "times_s": res["times_s"], "method": recipe.describe(),
                      "qdq": qdq_stats(path), "ops": optimized_ops(path, args.threads), "max_abs_vs_fp32": diff}
        logger.info("%s: median %.3f s", name, res["median_s"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"int8_recipes_{Path(args.checkpoint).name}_{args.layers}l_{args.frames}x{args.height}x{args.width}"
    from thfm_serve.machine import read_cpu

    machine = read_cpu()
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "layers": args.layers, "total_layers": total_layers,
                                                  "threads": args.threads, "runs": args.runs, "machine": machine.to_dict(),
                                                  "rows": rows}, indent=1))
    lines = [f"# int8 Q/DQ recipes in onnxruntime: first {args.layers} of {total_layers} blocks, "
             f"{args.frames} frames {args.height}x{args.width}", "", "Command:", "", "```", command, "```", "",
             f"Machine: {machine.describe()}. {args.threads} threads, median of {args.runs} runs after "
             f"{args.warmup} warm-up.", "",
             "| variant | median | vs fp32 | QLinearMatMul | float MatMul/FusedMatMul | QLinearSoftmax | "
             "DequantizeLinear | max abs vs fp32 |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        ops = r["ops"]
        diff = ", ".join(f"{k} {v:.2g}" for k, v in r.get("max_abs_vs_fp32", {}).items()) or "-"
        lines.append(f"| {name} | {r['median_s']:.3f} s | {rows['fp32']['median_s'] / r['median_s']:.2f}x | "
                     f"{ops.get('QLinearMatMul', 0)} | {ops.get('MatMul', 0) + ops.get('FusedMatMul', 0)} | "
                     f"{ops.get('QLinearSoftmax', 0)} | {ops.get('DequantizeLinear', 0)} | {diff} |")
    lines += ["", "Op counts are of the graph onnxruntime runs after its optimisations (ORT_ENABLE_ALL)."]
    for name, r in rows.items():
        if "method" in r:
            lines.append(f"- {name}: {r['method']}")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    logger.info("wrote %s", out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
