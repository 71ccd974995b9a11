"""`thfm eval PRED_DIR GT_DIR`: score predictions against ground truth in the paper's metrics.

With --checkpoint CK (in-process) or --url HOST:PORT (through Triton) the engine first runs on every
GT_DIR/<clip>/video.mp4 and writes PRED_DIR/<clip>/<task>.npz; with --clips N an empty or missing
GT_DIR is first filled with a synthetic set (`thfm synth`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..errors import ThfmError

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("eval", help="score predictions against ground truth (depth, normals, matte, dense pose, keypoints)")
    p.add_argument("pred_dir", help="predictions: <clip>/<task>.npz (written here first with --checkpoint/--url)")
    p.add_argument("gt_dir", help="ground truth: <clip>/<task>.npz and <clip>/video.mp4 (thfm synth)")
    p.add_argument("--tasks", default="all", help="comma-separated tasks or 'all' (default)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="first run the engine in-process from this checkpoint on every clip")
    src.add_argument("--url", action="append", help="first run the engine through these Triton servers (HOST:PORT)")
    p.add_argument("--height", type=int, help="model height for --checkpoint (default: the checkpoint's)")
    p.add_argument("--width", type=int, help="model width for --checkpoint (default: the checkpoint's)")
    p.add_argument("--window", type=int, help="model window for --checkpoint (default: the checkpoint's)")
    synth = p.add_argument_group("render the ground truth first (when GT_DIR has no clips)")
    synth.add_argument("--clips", type=int, help="render this many synthetic clips into GT_DIR")
    synth.add_argument("--frames", type=int, default=17)
    synth.add_argument("--clip-height", type=int, default=128)
    synth.add_argument("--clip-width", type=int, default=128)
    synth.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth-align", choices=("scale_shift", "scale"), default="scale_shift",
                   help="alignment of relative depth to metric ground truth (default scale_shift)")
    p.add_argument("--no-baselines", action="store_true", help="skip the trivial baselines")
    p.add_argument("--json", help="write the report as JSON here (default PRED_DIR/eval.json)")
    p.add_argument("--markdown", help="write the markdown tables here (default PRED_DIR/eval.md)")
    p.set_defaults(func=run)


def _clips(gt_dir: Path) -> list[Path]:
    from ..synth.dataset import VIDEO_NAME

    return sorted(p for p in gt_dir.iterdir() if p.is_dir() and (p / VIDEO_NAME).exists()) if gt_dir.is_dir() else []


def predict_set(gt_dir: Path, pred_dir: Path, tasks: list[str], checkpoint: str | None = None,
                urls: list[str] | None = None, height: int | None = None, width: int | None = None,
                window: int | None = None) -> int:
    """Run the engine on GT_DIR/<clip>/video.mp4 for every clip; returns the number of clips."""
    from ..synth.dataset import VIDEO_NAME

    clips = _clips(gt_dir)
    if not clips:
        raise ThfmError(f"{gt_dir} has no <clip>/{VIDEO_NAME} to run the engine on")
    if checkpoint:
        import torch

        from ..checkpoint import missing_parts
        from ..errors import CheckpointError
        from ..pipeline import ThfmPipeline, write_results
        from ..video import read_video

        missing = missing_parts(checkpoint)
        if missing:
            raise CheckpointError(f"checkpoint {checkpoint} is missing {', '.join(missing)}")
        pipe = ThfmPipeline.from_checkpoint(checkpoint, dtype=torch.float32)
        for clip in clips:
            video = read_video(clip / VIDEO_NAME)
            write_results(pipe.run(video.frames, tasks, height, width, window), pred_dir / clip.name)
            logger.info("predicted %s", clip.name)
    else:
        from thfm_serve.client.command import write_npz
        from thfm_serve.client.sync import ThfmClient

        with ThfmClient(urls) as client:
            for clip in clips:
                write_npz(client.predict(clip / VIDEO_NAME, tasks).results, pred_dir / clip.name)
                logger.info("predicted %s", clip.name)
    return len(clips)


def run(args) -> int:
    from ..config import parse_tasks
    from ..evaluation import evaluate_dirs

    tasks = parse_tasks(args.tasks)
    gt_dir, pred_dir = Path(args.gt_dir), Path(args.pred_dir)
    if args.clips is not None and not _clips(gt_dir):
        from ..synth.dataset import write_set

        write_set(gt_dir, args.clips, args.frames, args.clip_height, args.clip_width, args.seed)
    if args.checkpoint or args.url:
        n = predict_set(gt_dir, pred_dir, tasks, args.checkpoint, args.url, args.height, args.width, args.window)
        logger.info("ran the engine on %d clips into %s", n, pred_dir)
    report = evaluate_dirs(pred_dir, gt_dir, tasks, args.depth_align, baselines=not args.no_baselines)
    md = report.to_markdown()
    json_path = Path(args.json) if args.json else pred_dir / "eval.json"
    md_path = Path(args.markdown) if args.markdown else pred_dir / "eval.md"
    json_path.write_text(report.to_json())
    md_path.write_text(md)
    sys.stdout.write(md)  # the command's result, not a diagnostic
    logger.info("wrote %s and %s", json_path, md_path)
    return 0
