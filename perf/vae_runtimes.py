"""A repository's VAE graphs in each CPU runtime serving can use: onnxruntime fp32 against OpenVINO f32 and bf16.

    .venv/bin/python perf/vae_runtimes.py --repo runs/repo13_bf16v

One encoder window and one decoder row at the repository's export shape (the graphs on disk are fp32
for fp32 and bf16 VAEs alike), random inputs, each runtime in the session serving creates
(thfm_serve.serving.sessions: create_session for onnxruntime, OpenVinoSession for OpenVINO, compiled
for the input's shape first and that compilation timed apart), one timed run each on --threads
threads, and each OpenVINO output's largest and mean difference from onnxruntime's. Logs one line per
runtime; bf16 is skipped (and says so) on a CPU without bf16 instructions, where it would run in f32.
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

logger = logging.getLogger("vae_runtimes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, help="a model repository with vae_encoder and vae_decoder")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from thfm_serve.contract.protocol import VAE_DECODER, VAE_ENCODER
    from thfm_serve.machine import read_cpu
    from thfm_serve.serving import load_assets
    from thfm_serve.serving.sessions import OpenVinoSession, create_session

    repo = Path(args.repo)
    specs = load_assets(repo).specs
    cpu = read_cpu()
    logger.info("machine: %s", cpu.describe())
    rng = np.random.default_rng(0)
    for name in (VAE_ENCODER, VAE_DECODER):
        spec = specs[name]
        inp = spec.input_names[0]
        x = rng.standard_normal(spec.shape(inp, "opt")).astype(np.float32)
        path = repo / name / "1" / "model.onnx"
        t0 = time.perf_counter()
        ref = create_session(path, args.threads).run(None, {inp: x})[0]
        t_ort = time.perf_counter() - t0
        logger.info("%s %s: onnxruntime fp32 %.1f s", name, tuple(x.shape), t_ort)
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and not cpu.bf16:
                logger.info("%s: OpenVINO bf16 skipped: no bf16 instructions on this CPU", name)
                continue
            session = OpenVinoSession(path, args.threads, precision)
            t0 = time.perf_counter()
            session.prepare({inp: x.shape})
            t_compile = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = session.run(None, {inp: x})[0]
            t_run = time.perf_counter() - t0
            d = np.abs(got - ref)
            logger.info("%s: OpenVINO %s: compile %.1f s, run %.1f s (%.2fx onnxruntime fp32), max abs %.3g, mean %.3g",
                        name, session.inference_precision, t_compile, t_run, t_ort / t_run, d.max(), d.mean())
    return 0


if __name__ == "__main__":
    sys.exit(main())
