"""`thfm export`: checkpoint -> validated ONNX (+ TensorRT engine for --target gpu) in a model repository."""

from __future__ import annotations

import logging

from thfm_serve.contract.specs import MAX_BATCH, VAE_PRECISIONS, Precision, Runtime, Target
from thfm_serve.machine import OPENVINO_FP32_VAE_CLASSES
from thfm_serve.options import LIMIT_PREFIX, ExportOptions

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export the core and the VAE to ONNX (and TensorRT for --target gpu) into a model repository",
        description="Exports, validates against PyTorch (fatal on mismatch) and writes "
        "<repo>/{core,vae_encoder,vae_decoder}/1/ with manifests and <repo>/export_report.json. "
        "Artifacts whose manifest matches the checkpoint, precision and spec are reused.",
    )
    p.add_argument("--checkpoint", required=True, help="THFM checkpoint directory")
    p.add_argument("--repo", required=True, help="model repository directory (created if missing)")
    # Choices are checked by the exporter (ThfmError: one line, exit 2), not argparse, so every bad
    # value is reported the same way.
    p.add_argument("--target", default=Target.CPU.value, metavar="{" + ",".join(t.value for t in Target) + "}",
                   help="cpu: ONNX for onnxruntime; gpu: also a TensorRT engine for the core (default cpu)")
    p.add_argument("--precision", default=None, metavar="{" + ",".join(q.value for q in Precision) + "}",
                   help="core precision; the VAE's is --vae-precision (default for cpu: chosen for this machine's instruction sets and logged, int8 with AVX2 and up, fp32 below, never bf16; bf16 for gpu; fp8 is gpu only)")
    p.add_argument("--vae-precision", default=None, metavar="{" + ",".join(q.value for q in VAE_PRECISIONS) + "}",
                   help="VAE encoder and decoder precision (default: for cpu chosen for this machine and logged, bf16 "
                   "with bf16 instructions, fp32 without; fp32 for gpu, the only one there). bf16: the fp32 graph run by "
                   "OpenVINO's CPU plugin in bf16, on CPUs with bf16 instructions (avx512_bf16, amx_bf16) only; no "
                   "calibration. int8: Q/DQ on the convolutions (int8 per-channel weights, uint8 activations) for "
                   "onnxruntime's int8 conv kernels, the decoder's last up block and conv_out kept float; calibrated on "
                   "the --calibration clips. Either is fatal if its task drift against the fp32 PyTorch VAE exceeds the "
                   "stated bounds. Measured speed and drift per machine class: export/RESULTS.md")
    p.add_argument("--core-runtime", default=None, metavar="{" + ",".join(r.value for r in Runtime) + "}",
                   help="what runs the core on --target cpu (default: chosen for this machine and logged, openvino for an "
                   "int8 core on CPUs with bf16 instructions, onnxruntime otherwise). openvino: the same ONNX graph "
                   "compiled by OpenVINO's CPU plugin, int8 linears in int8 and the float remainder in bf16 where the CPU "
                   "has bf16 instructions; int8 or fp32 cores only; validated in OpenVINO at export")
    p.add_argument("--vae-runtime", default=None, metavar="{" + ",".join(r.value for r in Runtime) + "}",
                   help="what runs the VAE graphs on --target cpu (default: chosen for this machine and logged: openvino "
                   "for a bf16 VAE, the only runtime it has, and for an fp32 one on the "
                   f"{', '.join(OPENVINO_FP32_VAE_CLASSES)} classes, where OpenVINO's f32 convolutions were measured "
                   "faster with the same values; "
                   "onnxruntime otherwise, and always for an int8 VAE). Validated in the runtime that will serve it")
    p.add_argument("--frames", type=int, help="export window, 4n+1 frames (default: the checkpoint's)")
    p.add_argument("--height", type=int, help="export height, multiple of 16 (default: the checkpoint's)")
    p.add_argument("--width", type=int, help="export width, multiple of 16 (default: the checkpoint's)")
    p.add_argument("--calibration", nargs="+", metavar="VIDEO",
                   help="int8: calibration videos (default: procedurally generated clips of a walking figure)")
    p.add_argument("--calibration-clips", type=int, help="int8: generated clips when no video is given (default 2 for the core, 4 for the VAE)")
    p.add_argument("--only", nargs="+", metavar="MODEL", help="export only these of core, vae_encoder, vae_decoder")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help=f"profile max batch (default {MAX_BATCH}: one row per task)")
    p.add_argument("--max-frames", type=int, help="profile max frames (default: the larger of the export and checkpoint clip)")
    p.add_argument("--max-height", type=int, help="profile max height")
    p.add_argument("--max-width", type=int, help="profile max width")
    p.add_argument("--no-engine", action="store_true", help="--target gpu: write the ONNX only, build no TensorRT engine")
    p.add_argument("--no-configs", action="store_true", help="write only the exported artifacts, no Triton configs")
    p.add_argument("--force", action="store_true", help="re-export even when the manifests match")
    # Request limits of the served repository (thfm_serve.contract.params.Limits; each flag's dest is
    # LIMIT_PREFIX + the field). --max-frames above is the export profile's, hence the "request" in
    # these names. Unset ones keep what the repository has (the defaults for a new one).
    limits = p.add_argument_group("request limits (written into the Triton configs; unset: keep the repository's)")
    limits.add_argument("--max-request-frames", dest=LIMIT_PREFIX + "max_frames", type=int, metavar="N",
                        help="frames per request (default 600)")
    limits.add_argument("--max-request-pixels", dest=LIMIT_PREFIX + "max_pixels", type=int, metavar="N",
                        help="pixels per frame, height x width (default 1920*1080)")
    limits.add_argument("--max-request-bytes", dest=LIMIT_PREFIX + "max_request_bytes", type=int, metavar="N",
                        help="bytes of video or raw frames per request (default 256 MiB)")
    limits.add_argument("--max-response-bytes", dest=LIMIT_PREFIX + "max_response_bytes", type=int, metavar="N",
                        help="bytes of one response, float32 outputs of every task asked for (default 1 GiB; "
                        "at most 2 GiB less 1 MiB, gRPC's ceiling)")
    limits.add_argument("--max-in-flight", dest=LIMIT_PREFIX + "max_in_flight", type=int, metavar="N",
                        help="requests waiting at the entry model before new ones are rejected as busy (default 8)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .build import export_repository

    opts = ExportOptions.from_args(args).validate()
    report = export_repository(opts.checkpoint, opts.repo, **opts.export_kwargs())
    if opts.limits:
        from thfm_serve.repository import set_limits

        set_limits(opts.repo, **opts.limits)
    for name, entry in report["models"].items():
        logger.info("%s: %s", name, entry.get("status"))
    logger.info("export report: %s/export_report.json (%.1f s)", opts.repo, report["seconds"])
    return 0
