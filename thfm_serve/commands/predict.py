"""`thfm predict VIDEO --tasks LIST --out DIR` with `--checkpoint DIR` (in-process) or `--url`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import ThfmError

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("predict", help="run tasks on a video and write one <task>.npz per task")
    p.add_argument("video", help="video file (mp4, avi, mov, mkv, webm)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run in-process from this checkpoint directory")
    src.add_argument("--url", action="append", help="Triton gRPC endpoint HOST:PORT (repeat to spread windows over servers)")
    p.add_argument("--tasks", default="all", help="comma-separated: depth,normals,segmentation,densepose,keypoints2d,keypoints3d or 'all'")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--height", type=int, help="model height (multiple of 16; default: checkpoint's)")
    p.add_argument("--width", type=int, help="model width (multiple of 16; default: checkpoint's)")
    p.add_argument("--window", type=int, help="frames per model window, 4n+1 (default: checkpoint's)")
    p.add_argument("--prompt", action="append", default=[], metavar="TASK=TEXT",
                   help="free-form prompt for a task (in-process, needs the checkpoint's text encoder)")
    p.add_argument("--bf16", action="store_true", help="run the transformer in bfloat16 (in-process; warns where the CPU has no bf16 instructions, "
                   "which makes it slower than fp32)")
    p.add_argument("--overlap", type=int, default=None,
                   help="frames shared by neighbouring windows, cross-faded when stitched (default: the "
                   "served model's, about 1/8 of the model window; the same policy in-process and served)")
    p.add_argument("--max-frames", type=int, default=None, help="refuse videos longer than this")
    p.add_argument("--output-size", choices=("input", "model"), default="input",
                   help="resolution of the dense maps: the input video's (default) or the model grid's "
                   "(smaller answers for large videos; keypoints stay in input pixels)")
    p.add_argument("--pictures", action=argparse.BooleanOptionalAction, default=False,
                   help="also write pictures to look at: <out>/pictures/<task>.mp4 and a contact sheet "
                   "<task>.png per task (default: off)")
    remote = p.add_argument_group("with --url (through Triton)")
    remote.add_argument("--send", choices=("video", "frames"), default="video",
                        help="send each window as losslessly encoded video (default; small on the wire) "
                        "or as raw RGB frames")
    remote.add_argument("--max-in-flight", type=int, default=None,
                        help="requests at once over all servers (default: 2 per --url)")
    remote.add_argument("--timeout", type=float, default=None, help="seconds per request (default 600)")
    remote.add_argument("--retries", type=int, default=None,
                        help="extra tries per window after a server failure, on another server (default 3)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import parse_tasks
    from ..options import PredictOptions
    from ..video import read_video

    opts = PredictOptions.from_args(args).validate()
    tasks = parse_tasks(opts.tasks)  # unknown task names fail before any heavy work
    if opts.served:
        from thfm_serve.client.command import run_remote

        return run_remote(opts, tasks)

    # Cheap checks first (prompts, the video itself), so a bad input fails before torch and
    # diffusers are imported (seconds) and before weights load.
    prompts = opts.prompts
    unknown = set(prompts) - set(tasks)
    if unknown:
        raise ThfmError(f"--prompt given for tasks not requested: {sorted(unknown)}")
    video = read_video(opts.video, max_frames=opts.max_frames)
    logger.info("decoded %s: %d frames %dx%d at %.2f fps", opts.video, *video.frames.shape[:3], video.fps)

    import torch

    from ..checkpoint import missing_parts
    from ..errors import CheckpointError
    from ..pipeline import ThfmPipeline, write_results

    missing = missing_parts(opts.checkpoint)
    if missing:
        raise CheckpointError(f"checkpoint {opts.checkpoint} is missing {', '.join(missing)}")
    if opts.bf16:
        from ..machine import read_cpu, torch_bf16_advice

        advice = torch_bf16_advice(read_cpu())
        if advice:  # an explicit --bf16 is honoured, but never silently slow
            logger.warning("--bf16: %s", advice)
    pipe = ThfmPipeline.from_checkpoint(opts.checkpoint, dtype=torch.bfloat16 if opts.bf16 else torch.float32)
    results = pipe.run(video.frames, tasks, opts.height, opts.width, opts.window, prompts, overlap=opts.overlap,
                       output_size=opts.output_size)
    for path in write_results(results, opts.out):
        logger.info("wrote %s", path)
    if opts.pictures:
        from ..visualize import write_pictures

        pics = write_pictures(results, Path(opts.out) / "pictures", video.frames, video.fps)
        logger.info("wrote %d pictures to %s", len(pics), Path(opts.out) / "pictures")
    logger.info("outputs in %s", Path(opts.out).resolve())
    return 0
