"""A repository's graphs in each CPU runtime serving can use: onnxruntime against OpenVINO f32 and bf16.

    .venv/bin/python perf/runtimes.py --repo runs/repo13_ovcore [--models core vae_decoder]

At the repository's export shape, random inputs (the core's text rows are the repository's task
embeddings, one row per task, as a request for every task sends them): one encoder window, one
decoder row, the core's six task rows. Each runtime runs in the session serving creates
(thfm_serve.serving.sessions: create_session for onnxruntime, OpenVinoSession for OpenVINO, compiled
for the input's shape first and that compilation timed apart), one timed run each on --threads
threads, and each OpenVINO output's largest and mean difference from onnxruntime's. onnxruntime runs
the graph on disk (fp32, or the int8 Q/DQ core); OpenVINO runs it with f32 and with bf16 inference
precision (for the int8 core: its linears int8 either way, the float remainder f32 or bf16). Logs one
line per runtime; bf16 is skipped (and says so) on a CPU without bf16 instructions, where it would
run in f32.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("runtimes")


def _inputs(name: str, spec, assets, rng) -> dict[str, np.ndarray]:
    from thfm_serve.contract.protocol import CORE, CORE_IN

    if name != CORE:
        inp = spec.input_names[0]
        return {inp: rng.standard_normal(spec.shape(inp, "opt")).astype(np.float32)}
    emb = assets.embeddings()
    text = np.stack([np.asarray(emb[t], np.float32) for t in emb])
    latent = rng.standard_normal((len(text), *spec.shape(CORE_IN[0], "opt")[1:])).astype(np.float32)
    return {CORE_IN[0]: latent, CORE_IN[1]: text}


def main(argv: list[str] | None = None) -> int:
    from thfm_serve.contract.protocol import CORE, VAE_DECODER, VAE_ENCODER

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, help="a model repository")
    p.add_argument("--models", nargs="+", default=[VAE_ENCODER, VAE_DECODER, CORE], choices=[VAE_ENCODER, VAE_DECODER, CORE])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from thfm_serve.machine import read_cpu
    from thfm_serve.serving import load_assets
    from thfm_serve.serving.sessions import OpenVinoSession, create_session

    repo = Path(args.repo)
    assets = load_assets(repo)
    cpu = read_cpu()
    logger.info("machine: %s", cpu.describe())
    rng = np.random.default_rng(0)
    for name in args.models:
        spec = assets.specs[name]
        feeds = _inputs(name, spec, assets, rng)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())
        path = repo / name / "1" / "model.onnx"
        graph = "int8" if spec.precision == "int8" else "fp32"  # a bf16 VAE's graph on disk is fp32
        t0 = time.perf_counter()
        ref = create_session(path, args.threads).run(None, feeds)
        t_ort = time.perf_counter() - t0
        logger.info("%s (%s): onnxruntime %s graph %.1f s", name, shapes, graph, t_ort)
        # The session's precision argument picks the inference precision (openvino_inference_precision).
        for precision in ("fp32", "int8" if graph == "int8" else "bf16"):
            session = OpenVinoSession(path, args.threads, precision)
            if precision != "fp32" and session.inference_precision != "bf16":
                logger.info("%s: OpenVINO bf16 skipped: no bf16 instructions on this CPU", name)
                continue
            t0 = time.perf_counter()
            session.prepare({k: v.shape for k, v in feeds.items()})
            t_compile = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = session.run(None, feeds)
            t_run = time.perf_counter() - t0
            diffs = ", ".join(f"{o.name} max abs {np.abs(g - r).max():.3g} mean {np.abs(g - r).mean():.3g}"
                              for o, g, r in zip(session.get_outputs(), got, ref))
            logger.info("%s: OpenVINO %s inference precision: compile %.1f s, run %.1f s (%.2fx onnxruntime), %s",
                        name, session.inference_precision, t_compile, t_run, t_ort / t_run, diffs)
            del session
    return 0


if __name__ == "__main__":
    sys.exit(main())
