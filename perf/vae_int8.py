"""The Wan VAE in onnxruntime, fp32 against int8 (`thfm export --vae-precision int8`): time per window.

    .venv/bin/python perf/vae_int8.py --checkpoint runs/ck13 --frames 17 --height 256 --width 256

A checkpoint's VAE encoder and decoder are exported to fp32 ONNX at the window (frames x height x
width), quantised as the exporter does (export/quantize.py vae_recipe_for: Q/DQ on the convolutions but
the decoder's float tail, calibrated on the exporter's procedural clips, encoder on frames, decoder on
the clips' latents and the core's dense rows), the decoder also with every Conv int8 (what the tail
costs), and each graph is timed in onnxruntime with the serving session options
(thfm_serve.serving.create_session) on --threads threads: the encoder on one window, the decoder on
as many of one window's four dense rows as a CPU repository decodes in one call (--decoder-rows;
default: repository.CPU_VAE_CALL_PIXELS, so 4 at small grids and 1 at 17x256x256). Inputs are a
held-out clip (not a calibration clip). The report gives the machine class (thfm_serve.machine), the
medians, int8's speed-up, its largest difference from fp32 and what onnxruntime runs after its graph
optimisation (QLinearConv 2D/3D, float Convs left).

Writes nothing unless --out DIR is given (then DIR/vae_int8_<name>_<F>x<H>x<W>.{md,json}, or
DIR/<--name>.{md,json}, each with the command that made it); the table is always logged. ONNX files
are cached under --workdir (WORKDIR/<checkpoint>_<F>x<H>x<W>/<graph>/<recipe>/model.onnx; an fp32
graph placed there, e.g. a repository's exported VAE at the same window, is used as it is).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "perf") not in sys.path:  # the benchmark helpers (perf/engines.py) are not a package
    sys.path.insert(0, str(ROOT / "perf"))
from engines import time_onnx  # noqa: E402
logger = logging.getLogger("vae_int8")
CALIBRATION_CLIPS = 4  # the exporter's default for the VAE (export/calibration.py VAE_CLIPS)
HELD_OUT_SEED = 500  # not a calibration clip (seed 0) nor the export drift's (build.DRIFT_SEED)


def _first(result: dict[str, Any]) -> np.ndarray:
    return next(iter(result["outputs"].values()))


def _int8_row(fp32: dict[str, Any], int8: dict[str, Any], path: Path) -> dict[str, Any]:
    """One int8 graph's timings against the fp32 graph's, and what onnxruntime runs it as."""
    from thfm_serve.export.quantize import qlinear_conv_counts

    diff = np.abs(_first(int8) - _first(fp32))
    return {"int8_median_s": int8["median_s"], "int8_times_s": int8["times_s"],
            "speedup": fp32["median_s"] / int8["median_s"], "max_abs_vs_fp32": float(diff.max()),
            "mean_abs_vs_fp32": float(diff.mean()), "int8_runs_as": qlinear_conv_counts(path)}


def build_graphs(ck: Any, specs: dict, name: str, work: Path, frames: int, height: int, width: int,
                 every_conv: bool = True) -> dict[str, Path]:
    """fp32 and int8 graphs of `name` (cached in work/<name>/), and for the decoder also "int8_all"
    (unless every_conv is False): every Conv int8, the recipe without its float tail, so the tail's
    cost is measured beside it. Each int8 graph is calibrated on its own: at 17x256x256 on an
    AVX2-only CPU one decoder calibration (20 rows) takes about 30 minutes."""
    import dataclasses

    import onnx

    from thfm_serve.export.build import vae_feeds
    from thfm_serve.export.calibration import procedural_clips
    from thfm_serve.export.onnx_export import export_onnx
    from thfm_serve.export.quantize import quantize_vae, vae_recipe_for

    vae_recipe = vae_recipe_for()  # this machine's (7-bit weights without VNNI)
    from thfm_serve.contract.protocol import VAE_ENCODER

    paths = {"fp32": work / name / "fp32" / "model.onnx", "int8": work / name / vae_recipe.name / "model.onnx"}
    if not paths["fp32"].is_file():
        module = ck.vae_encoder() if name == VAE_ENCODER else ck.vae_decoder()
        logger.info("exporting %s (fp32) to %s", name, paths["fp32"])
        export_onnx(module, specs[name], paths["fp32"])
    recipes = {"int8": vae_recipe}
    if every_conv and vae_recipe.float_convs(onnx.load(str(paths["fp32"]), load_external_data=False)):
        every = dataclasses.replace(vae_recipe, name="onnxruntime-x86-conv", float_tail=False)
        recipes["int8_all"] = every
        paths["int8_all"] = work / name / every.name / "model.onnx"
    clips = procedural_clips(CALIBRATION_CLIPS, frames, height, width, seed=0)
    feeds = None
    for key, recipe in recipes.items():
        if not paths[key].is_file():
            feeds = feeds or vae_feeds(ck, name, clips, frames, height, width)
            quantize_vae(paths["fp32"], paths[key], feeds, recipe)
    return paths


def prepare(args: argparse.Namespace, work: Path, prepared: Path) -> None:
    """The graphs (build_graphs) and one held-out clip's inputs, saved under `work`; `prepared` names them."""
    from thfm_serve.checkpoint import load_checkpoint
    from thfm_serve.contract.protocol import VAE_DECODER, VAE_ENCODER
    from thfm_serve.contract.specs import build_specs
    from thfm_serve.export.build import vae_feeds
    from thfm_serve.export.calibration import procedural_clips

    ck = load_checkpoint(args.checkpoint, text_encoder=False)
    specs = build_specs(ck.config, args.frames, args.height, args.width)
    clip = procedural_clips(1, args.frames, args.height, args.width, seed=HELD_OUT_SEED)
    dims = (args.frames, args.height, args.width)
    feeds = {VAE_ENCODER: vae_feeds(ck, VAE_ENCODER, clip, *dims)[0],
             VAE_DECODER: vae_feeds(ck, VAE_DECODER, clip, *dims, rows=args.decoder_rows)[0]}
    graphs = {name: build_graphs(ck, specs, name, work, *dims, every_conv=not args.recipe_only) for name in feeds}
    path = work / f"held_out_rows{args.decoder_rows}.npz"
    np.savez(path, **{f"{name}/{k}": v for name, feed in feeds.items() for k, v in feed.items()})
    prepared.write_text(json.dumps({"feeds": str(path),
                                    "graphs": {n: {k: str(v) for k, v in p.items()} for n, p in graphs.items()}}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--frames", type=int, default=17, help="the window, 4n+1 frames")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decoder-rows", type=int, default=None,
                   help="decoder batch (default: the dense rows a CPU repository decodes in one call)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", help="write the .md/.json results here (default: log only)")
    p.add_argument("--recipe-only", action="store_true",
                   help="time the exporter's int8 recipe only, not also the every-Conv decoder (a second calibration)")
    p.add_argument("--name", help="result file stem (default vae_int8_<checkpoint>_<F>x<H>x<W>)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "vae_int8"))
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # the child process (see main)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = ("cd " + shlex.quote(str(ROOT)) + " && .venv/bin/python perf/vae_int8.py "
               + shlex.join(sys.argv[1:] if argv is None else argv))

    import torch

    from thfm_serve.export.quantize import vae_recipe_for

    vae_recipe = vae_recipe_for()
    from thfm_serve.machine import read_cpu

    from thfm_serve.config import DENSE_TASKS
    from thfm_serve.gpu_options import vae_batch_cap
    from thfm_serve.repository import CPU_VAE_CALL_PIXELS

    if args.decoder_rows is None:
        args.decoder_rows = vae_batch_cap(args.frames, args.height, args.width, len(DENSE_TASKS), CPU_VAE_CALL_PIXELS)
    if args.decoder_rows < 1 or args.threads < 1 or args.runs < 1:
        raise SystemExit("--decoder-rows, --threads and --runs must be at least 1")
    torch.set_num_threads(args.threads)
    cpu = read_cpu()
    shape = f"{args.frames}x{args.height}x{args.width}"
    work = Path(args.workdir) / f"{Path(args.checkpoint).resolve().name}_{shape}"
    prepared = work / f"prepared_rows{args.decoder_rows}.json"
    if args.prepare:
        prepare(args, work, prepared)
        return 0
    # The graphs and the held-out inputs are made in a child process: the checkpoint (a 1.3B transformer
    # is 5.7 GB in fp32) and what calibration allocated go back to the system when it exits, instead of
    # staying resident beside the timed sessions.
    subprocess.run([sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv),
                    "--decoder-rows", str(args.decoder_rows), "--prepare"], check=True)
    info = json.loads(prepared.read_text())
    graphs = {name: {k: Path(v) for k, v in paths.items()} for name, paths in info["graphs"].items()}
    with np.load(info["feeds"]) as z:
        feeds = {name: {k.split("/", 1)[1]: z[k] for k in z.files if k.split("/", 1)[0] == name} for name in graphs}

    rows: dict[str, dict[str, Any]] = {}
    every_conv: dict[str, dict[str, Any]] = {}  # the decoder without the recipe's float tail
    for name, paths in graphs.items():
        feed = feeds[name]
        results = {}
        for precision, path in paths.items():
            logger.info("timing %s %s (%s)", name, precision, ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items()))
            results[precision] = time_onnx(path, feed, args.threads, args.runs, args.warmup)
        fp32, int8 = results["fp32"], results["int8"]
        if "int8_all" in results:
            every_conv[name] = _int8_row(fp32, results["int8_all"], paths["int8_all"])
        rows[name] = {"input_shape": list(next(iter(feed.values())).shape), "fp32_median_s": fp32["median_s"],
                      "fp32_times_s": fp32["times_s"], **_int8_row(fp32, int8, paths["int8"])}

    lines = [f"# Wan VAE in onnxruntime, fp32 vs int8 Q/DQ: {Path(args.checkpoint).name}, window {shape}", "",
             "Command:", "", "```", command, "```", "",
             f"Machine: {cpu.describe()}. {args.threads} threads, median of {args.runs} runs after {args.warmup} "
             f"warm-up; decoder batch {args.decoder_rows} (dense-task rows per call).", "",
             "| graph | input | fp32 | int8 | int8 speed-up | max / mean abs vs fp32 | int8 runs as |",
             "|---|---|---:|---:|---:|---|---|"]
    table_rows = [(name, r) for name, r in rows.items()]
    table_rows += [(f"{name}, every Conv int8 (no float tail)", {**rows[name], **r}) for name, r in every_conv.items()]
    for label, r in table_rows:
        ops = r["int8_runs_as"]
        lines.append(f"| {label} | {r['input_shape']} | {r['fp32_median_s']:.3f} s | {r['int8_median_s']:.3f} s | "
                     f"{r['speedup']:.2f}x | {r['max_abs_vs_fp32']:.3g} / {r['mean_abs_vs_fp32']:.3g} | "
                     f"QLinearConv 3D {ops['qlinear_conv_3d']}, 2D {ops['qlinear_conv_2d']}, float Conv {ops['float_conv']} |")
    table = "\n".join(lines) + "\n"
    logger.info("\n%s", table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = args.name or f"vae_int8_{Path(args.checkpoint).resolve().name}_{shape}"
        (out / f"{stem}.md").write_text(table)
        (out / f"{stem}.json").write_text(json.dumps({"command": command, "machine": cpu.to_dict(), "threads": args.threads,
                                                      "runs": args.runs, "decoder_rows": args.decoder_rows,
                                                      "recipe": vae_recipe.describe(), "rows": rows,
                                                      "every_conv": every_conv}, indent=1))
        logger.info("wrote %s", out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
