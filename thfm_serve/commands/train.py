"""`thfm train DATA --out RUN (--checkpoint CK | --preset NAME)`: THFM's training recipe."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..contract.depth import DEPTH_ENCODINGS
from ..errors import ThfmError

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a checkpoint into THFM on clips with ground truth (the renderer's layout)",
        description="Stage 1 (only with --vae-steps, for a VAE without pretrained weights) trains the Wan "
        "VAE as an autoencoder on frames and task maps; stage 2 fine-tunes the transformer at timestep 0 "
        "(-v is the task latent; L2 in latent space for dense tasks, MLP heads on per-frame tokens for "
        "keypoints) on multi-task batches; stage 3 (only with --decoder-steps, same VAEs as stage 1) adapts "
        "the VAE decoder to the latents the trained core predicts. Checkpoints land in RUN/step-NNNNNNN/ and, at the end, "
        "RUN/checkpoint/; a run restarted with the same --out resumes from its latest step.",
    )
    p.add_argument("data", type=Path, help="training clips: DATA/<clip>/video.mp4 + <task>.npz")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, train_log.jsonl)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--checkpoint", type=Path, help="checkpoint to fine-tune (e.g. a diffusers Wan2.1 + thfm/ folder)")
    start.add_argument("--preset", help="start from a random-weight preset (written to RUN/init)")
    p.add_argument("--val-data", type=Path, help="held-out clips for validation metrics")
    p.add_argument("--tasks", default="all", help="comma-separated tasks to train (default: all)")
    p.add_argument("--frames", type=int, help="model window, 4n+1 (default: the checkpoint's)")
    p.add_argument("--height", type=int, help="model height, multiple of 16 (default: the checkpoint's)")
    p.add_argument("--width", type=int, help="model width, multiple of 16 (default: the checkpoint's)")
    p.add_argument("--max-clips", type=int, help="use only the first N training clips")
    p.add_argument("--depth-encoding", choices=DEPTH_ENCODINGS,
                   help="how depth targets are squashed into [0, 1] (contract.depth; default: the checkpoint's). "
                        "'log' centres the person and spreads its relief over the map")
    p.add_argument("--depth-scale", type=float, help="the depth code's gain a (default: the checkpoint's)")
    s1 = p.add_argument_group("stage 1: VAE autoencoder (small presets without pretrained weights)")
    s1.add_argument("--vae-steps", type=int, default=0, help="steps (default 0: the VAE stays as it is)")
    s1.add_argument("--vae-batch", type=int, default=4)
    s1.add_argument("--vae-frames", type=int,
                    help="frames per crop, 4n+1 (default: the model window; shorter crops leave the "
                         "window's later latent frames untrained)")
    s1.add_argument("--vae-crop", type=int, default=64, help="square crop size in pixels, 0 = whole frame (default 64)")
    s1.add_argument("--vae-lr", type=float, default=1e-3)
    s1.add_argument("--vae-kl", type=float, default=1e-4, help="KL weight (default 1e-4)")
    s1.add_argument("--vae-person-share", type=float, default=0.0,
                    help="share of crops centred on a visible joint of the person instead of uniform "
                         "(default 0; the person is where the thin structures are)")
    s1.add_argument("--vae-video-share", type=float, default=0.5,
                    help="share of crops taken from the video; the rest from the dense task maps (default "
                         "0.5). Every dense output is drawn by the decoder, the video only has to be encoded")
    s1.add_argument("--vae-person-weight", type=float, default=0.0,
                    help="extra L1 weight on the person's pixels: the loss weight is 1 + W * matte (default "
                         "0; every dense metric is taken on the person)")
    s1.add_argument("--vae-mean", dest="vae_sample", action="store_false",
                    help="reconstruct the posterior mean instead of a sample (a plain autoencoder: the KL "
                         "term only keeps the latents bounded; THFM encodes with the mean anyway)")
    s2 = p.add_argument_group("stage 2: transformer at timestep 0")
    s2.add_argument("--steps", type=int, default=1000, help="steps (default 1000)")
    s2.add_argument("--batch", type=int, default=8, help="rows per batch, tasks mixed (default 8)")
    s2.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4; ~1e-5 for real Wan weights)")
    s2.add_argument("--weight-decay", type=float, default=0.01)
    s2.add_argument("--warmup", type=int, default=100)
    s2.add_argument("--task-weight", action="append", default=[], metavar="TASK=W",
                    help="loss weight of a task (repeat; default 1 each)")
    s3 = p.add_argument_group("stage 3: the VAE decoder adapted to the trained core (small presets without "
                              "pretrained weights; crops and person weight from --vae-person-share/-weight)")
    s3.add_argument("--decoder-steps", type=int, default=0,
                    help="steps (default 0). The frozen core predicts each task's latent, the decoder learns "
                         "to draw the ground truth from it; the encoder and the latent space stay as they are")
    s3.add_argument("--decoder-lr", type=float, default=1e-4)
    s3.add_argument("--decoder-batch", type=int, default=4)
    s3.add_argument("--decoder-crop", type=int, default=64,
                    help="square crop of the predicted map in pixels, 0 = whole frame (default 64)")
    s3.add_argument("--decoder-windows", type=int, default=256,
                    help="training windows whose maps are kept in memory for this stage (default 256)")
    s3.add_argument("--decoder-angle-weight", type=float, default=0.0,
                    help="weight of the normals' mean angle (radians) on the person, beside the L1 (default 0)")
    s3.add_argument("--decoder-ssi-weight", type=float, default=0.0,
                    help="weight of the depth code's L1 after its least-squares scale and shift per frame on the "
                         "person, the alignment the depth metric makes (default 0)")
    s3.add_argument("--decoder-iou-weight", type=float, default=0.0,
                    help="weight of 1 - soft IoU of the drawn matte (default 0)")
    run = p.add_argument_group("run")
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                     help="autocast precision of the forward pass (fp16 adds a gradient scaler)")
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--load-workers", type=int, default=1,
                     help="threads reading the training clips into memory (default 1; on a GPU host the "
                          "cores would otherwise idle while one decodes every clip)")
    run.add_argument("--seed", type=int, default=0, help="batch sampling (and preset weights) seed")
    run.add_argument("--save-every", type=int, default=500)
    run.add_argument("--keep", type=int, default=2, help="step folders to keep (default 2)")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--val-every", type=int, default=500)
    run.add_argument("--val-windows", type=int, default=8, help="held-out windows per validation (default 8)")
    run.add_argument("--eval-every", type=int, default=0,
                     help="run `thfm eval` on the whole --val-data set every N steps (default 0: at the end only)")
    run.add_argument("--save-dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                     help="storage precision of the final checkpoint's transformer, heads and VAE; the step "
                          "folders stay fp32 (default fp32)")
    run.add_argument("--no-resume", dest="resume", action="store_false",
                     help="start over even if RUN has step folders")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..config import parse_tasks
    from ..training.core_stage import parse_task_weights
    from ..training.trainer import TrainConfig, train

    try:
        weights = parse_task_weights(args.task_weight)
    except ValueError as e:
        raise ThfmError(str(e)) from None
    cfg = TrainConfig(
        data=args.data, out=args.out, checkpoint=args.checkpoint, preset=args.preset, val_data=args.val_data,
        tasks=parse_tasks(args.tasks), frames=args.frames, height=args.height, width=args.width,
        max_clips=args.max_clips, depth_encoding=args.depth_encoding, depth_scale=args.depth_scale,
        vae_steps=args.vae_steps, vae_batch=args.vae_batch, vae_frames=args.vae_frames,
        vae_crop=args.vae_crop or None, vae_lr=args.vae_lr, vae_kl=args.vae_kl, vae_sample=args.vae_sample, vae_person_share=args.vae_person_share,
        vae_video_share=args.vae_video_share, vae_person_weight=args.vae_person_weight,
        core_steps=args.steps, decoder_steps=args.decoder_steps, decoder_lr=args.decoder_lr,
        decoder_batch=args.decoder_batch, decoder_crop=args.decoder_crop or None, decoder_windows=args.decoder_windows,
        decoder_angle_weight=args.decoder_angle_weight, decoder_ssi_weight=args.decoder_ssi_weight,
        decoder_iou_weight=args.decoder_iou_weight,
        batch=args.batch, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, task_weights=weights,
        precision=args.precision, device=args.device, threads=args.threads, load_workers=args.load_workers, seed=args.seed,
        save_every=args.save_every, keep=args.keep, log_every=args.log_every, val_every=args.val_every,
        val_windows=args.val_windows, eval_every=args.eval_every, save_dtype=args.save_dtype, resume=args.resume,
    )
    final = train(cfg)
    logger.info("trained checkpoint in %s", final)
    return 0
