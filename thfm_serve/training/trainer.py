"""The training run: starting checkpoint -> stage 1 (VAE, small presets only) -> stage 2 (core) ->
stage 3 (the VAE decoder adapted to the core, small presets only).

A run folder holds `step-NNNNNNN/` checkpoints written at intervals (each loadable as is, with
`train_state/` to resume from), `train_log.jsonl` (one line per logged step and per validation),
`latents/` (stage 2's frozen-VAE latents, read back on resume: `core_stage.cache_latents`) and, at
the end, `checkpoint/`: the trained model in the project's layout, stored in `save_dtype`.
Steps are counted over the whole run: stage 1 covers [0, vae_steps), stage 2 the `core_steps` after,
stage 3 the `decoder_steps` after that.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, init_checkpoint, load_checkpoint
from ..config import DENSE_TASKS, PRESETS, TASKS, check_resolution, latent_frames
from ..errors import ThfmError
from ..model import ThfmCore, VaeDecoder, VaeEncoder
from . import core_stage, decoder_stage, state, vae_stage
from .cpu_bf16 import check_cpu_bf16_training
from .data import find_clips, load_samples

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Wan2.1's own VAE width (base_dim 96): a VAE of this shape is treated as the pretrained Wan VAE,
# which THFM keeps frozen, so stage 1 refuses it.
WAN_VAE_BASE_DIM = 96


class TrainError(ThfmError):
    """A training setting or state that cannot work (named in the message)."""


@dataclass
class TrainConfig:
    data: Path
    out: Path
    checkpoint: Path | None = None  # start from this checkpoint ...
    preset: str | None = None  # ... or from a random-weight preset written into out/init
    val_data: Path | None = None
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    frames: int | None = None  # model window (4n+1); default: the checkpoint's
    height: int | None = None
    width: int | None = None
    max_clips: int | None = None
    # the depth targets' code (contract.depth); None: the checkpoint's. A changed code changes every
    # depth latent, so it belongs to a core stage that trains depth (the VAE carries either).
    depth_encoding: str | None = None
    depth_scale: float | None = None
    # stage 1: the VAE as an autoencoder (only for a VAE without pretrained weights)
    vae_steps: int = 0
    vae_batch: int = 4
    vae_frames: int | None = None  # frames per crop; None: the model window (every latent chunk)
    vae_crop: int | None = 64
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4
    vae_sample: bool = True  # reconstruct a posterior sample (False: the posterior mean)
    vae_person_share: float = 0.0  # share of crops centred on the person (on a visible joint)
    vae_video_share: float = 0.5  # share of crops from the video (the rest from dense task maps)
    vae_person_weight: float = 0.0  # extra L1 weight on the person's pixels (loss weight 1 + w * matte)
    # stage 2: the transformer fine-tune at timestep 0
    core_steps: int = 1000
    batch: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 100
    task_weights: dict[str, float] = field(default_factory=dict)
    # stage 3: the VAE decoder adapted to the trained core (small presets; crops and person weight as
    # stage 1's --vae-person-share / --vae-person-weight)
    decoder_steps: int = 0
    decoder_lr: float = 1e-4
    decoder_batch: int = 4
    decoder_crop: int | None = 64
    decoder_windows: int = 256  # training windows whose maps stay in memory for this stage
    # stage 3's terms in task units (decoder_stage.MetricTerms): normals angle, depth after its per-frame
    # scale and shift, matte soft IoU; 0 leaves the L1 alone
    decoder_angle_weight: float = 0.0
    decoder_ssi_weight: float = 0.0
    decoder_iou_weight: float = 0.0
    # run
    precision: str = "fp32"
    device: str = "cpu"
    threads: int | None = None
    load_workers: int = 1  # threads reading the clips (a GPU host has the cores to spare)
    seed: int = 0
    save_every: int = 500
    keep: int = 2
    log_every: int = 10
    val_every: int = 500
    val_windows: int = 8
    eval_every: int = 0  # run `thfm eval` on the whole validation set every N steps (0: at the end only)
    save_dtype: str = "fp32"
    resume: bool = True

    def validate(self) -> "TrainConfig":
        if (self.checkpoint is None) == (self.preset is None):
            raise TrainError("give exactly one of --checkpoint (a checkpoint to fine-tune) and --preset")
        if self.preset is not None and self.preset not in PRESETS:
            raise TrainError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if self.save_dtype not in SAVE_DTYPES:
            raise TrainError(f"--save-dtype {self.save_dtype!r}: choose from {', '.join(SAVE_DTYPES)}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise TrainError(f"tasks {unknown or '(none)'}: choose from {', '.join(TASKS)}")
        for name in ("vae_steps", "core_steps", "decoder_steps"):
            if getattr(self, name) < 0:
                raise TrainError(f"{name} must be >= 0")
        for name in ("vae_person_share", "vae_video_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TrainError(f"--{name.replace('_', '-')} {getattr(self, name)} must be between 0 and 1")
        if self.eval_every < 0:
            raise TrainError("eval_every must be >= 0")
        if self.vae_person_weight < 0:
            raise TrainError(f"--vae-person-weight {self.vae_person_weight} must be at least 0")
        try:
            self.metric_terms()
        except ValueError as e:
            raise TrainError(f"--decoder-angle-weight / --decoder-ssi-weight / --decoder-iou-weight: {e}") from None
        for name in ("vae_batch", "batch", "decoder_batch", "decoder_windows", "save_every", "log_every", "val_every",
                     "load_workers"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1")
        if self.vae_frames is not None and (self.vae_frames < 1 or (self.vae_frames - 1) % 4):
            raise TrainError(f"--vae-frames {self.vae_frames} is not of the form 4n+1")
        for name in ("vae_crop", "decoder_crop"):
            crop = getattr(self, name)
            if crop is not None and (crop < 16 or crop % 16):
                raise TrainError(f"--{name.replace('_', '-')} {crop} must be a multiple of 16 (at least 16)")
        if self.frames is not None:
            latent_frames(self.frames)
        if (self.height is None) != (self.width is None):
            raise TrainError("give both --height and --width, or neither")
        if self.height is not None:
            check_resolution(self.height, self.width)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise TrainError(f"--device {self.device}: CUDA is not available in this PyTorch")
        return self

    def metric_terms(self) -> decoder_stage.MetricTerms:
        return decoder_stage.MetricTerms(normals_angle=self.decoder_angle_weight, depth_ssi=self.decoder_ssi_weight,
                                         matte_iou=self.decoder_iou_weight)


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


class _Log:
    """RUN/train_log.jsonl: one JSON object per logged step, validation and eval (appended, so a resumed
    run continues the same file)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _bar(total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
                disable=None)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the final checkpoint folder."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    autocast = PRECISIONS[cfg.precision]
    if device.type == "cpu" and cfg.precision == "bf16":
        check_cpu_bf16_training()  # before any convolution of the run (it may cap oneDNN's ISA)
    # Cheap checks first: a wrong data folder fails before any checkpoint is written or loaded.
    find_clips(cfg.data)
    if cfg.val_data:
        find_clips(cfg.val_data)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    log = _Log(run / "train_log.jsonl")
    gen = torch.Generator().manual_seed(cfg.seed)

    # 1. Where to start: the latest step folder of this run, or the given checkpoint / preset.
    resume_from = state.latest_step(run) if cfg.resume else None
    if resume_from is not None:
        source = resume_from
        logger.info("resuming from %s", resume_from)
    elif cfg.checkpoint is not None:
        source = Path(cfg.checkpoint)
    else:
        source = run / "init"
        if not (source / "thfm" / "config.json").is_file():
            init_checkpoint(cfg.preset, source, seed=cfg.seed)
    ck = load_checkpoint(source)
    tcfg = ck.config
    frames, height, width = cfg.frames or tcfg.frames, cfg.height or tcfg.height, cfg.width or tcfg.width
    tcfg.frames, tcfg.height, tcfg.width = frames, height, width  # the trained geometry is the new default
    tcfg.depth_encoding = cfg.depth_encoding or tcfg.depth_encoding
    tcfg.depth_log_scale = cfg.depth_scale if cfg.depth_scale is not None else tcfg.depth_log_scale
    tcfg.validate()
    missing = [t for t in cfg.tasks if t not in ck.prompt_embeds]
    if missing:
        raise TrainError(f"checkpoint {source} has no cached prompt embeddings for {missing}")
    done = 0
    saved_state = None
    if resume_from is not None:
        saved_state = state.load_train_state(resume_from, None, gen)  # the sampler's RNG; the optimizer below
        done = int(saved_state["step"])
    core_end = cfg.vae_steps + cfg.core_steps
    total = core_end + cfg.decoder_steps
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    logger.info("training %s: %d frames at %dx%d, steps %d (VAE) + %d (core) + %d (decoder), %d done", source, frames,
                height, width, cfg.vae_steps, cfg.core_steps, cfg.decoder_steps, done)
    if (cfg.vae_steps or cfg.decoder_steps) and ck.vae.config.base_dim >= WAN_VAE_BASE_DIM:
        raise TrainError(
            f"--vae-steps/--decoder-steps: the checkpoint's VAE has Wan2.1's shape (base_dim "
            f"{ck.vae.config.base_dim}); THFM keeps the pretrained Wan VAE frozen. Leave both at 0."
        )

    # 2. Data: every window of every clip, on the model grid.
    samples = load_samples(cfg.data, frames, height, width, tcfg.num_joints, tcfg.depth_code, cfg.max_clips,
                           cfg.load_workers)
    val_samples = (load_samples(cfg.val_data, frames, height, width, tcfg.num_joints, tcfg.depth_code)[: cfg.val_windows]
                   if cfg.val_data else [])

    def save(step: int, stage_name: str, optimizer) -> Path:
        out = state.write_checkpoint(state.step_dir(run, step), source, tcfg, ck.transformer, ck.vae, ck.heads,
                                     ck.prompt_embeds)
        final_vae = stage_name == "vae" and step >= cfg.vae_steps  # latent statistics are in its config
        state.save_train_state(out, {"step": step, "stage": stage_name, "settings": settings,
                                     "vae_final": final_vae}, optimizer, gen)
        state.prune(run, cfg.keep)
        logger.info("saved %s", out)
        return out

    # 3. Stage 1: the VAE as an autoencoder on frames and task maps.
    if done < cfg.vae_steps:
        vae_frames = cfg.vae_frames or frames
        if vae_frames < frames:
            # The Wan VAE is causal: latent frame k is decoded from the caches of frames before it, so
            # crops of 4n+1 < window frames never train the later chunks of a window (their outputs
            # drift to a wrong global colour while the first chunks look fine).
            logger.warning("--vae-frames %d is shorter than the model window (%d frames): the window's later "
                           "latent frames are not trained", vae_frames, frames)
        _train_vae(cfg, ck, samples, vae_frames, done, device, autocast, gen, log, save, resume_from, saved_state)
        done = cfg.vae_steps
    elif saved_state and saved_state["stage"] == "vae" and not saved_state.get("vae_final") and cfg.vae_steps:
        # Resumed with --vae-steps lowered to a step stage 1 had already passed: finish stage 1 here.
        ck.vae.eval()
        vae_stage.set_latent_stats(ck.vae, samples)
    ck.vae.to(device).eval().requires_grad_(False)

    # 4. Stage 2: the transformer at timestep 0 on cached latents of the frozen VAE. Stage 2 frees the
    # windows' pixels; stage 3 keeps the maps of its first decoder_windows.
    kept = samples[: cfg.decoder_windows] if done < total and cfg.decoder_steps else []
    data = val = None
    if done < core_end:
        data, val = _train_core(cfg, ck, samples, val_samples, done, device, autocast, gen, log, save,
                           resume_from if saved_state and saved_state["stage"] == "core" else None)
        done = core_end

    # 5. Stage 3: the decoder adapted to what the trained core predicts.
    if done < total:
        if data is None:  # no stage 2 in this run, or resumed in stage 3: latents from the run's store
            encoder = VaeEncoder(ck.vae).to(device)
            data = core_stage.cache_latents(encoder, samples, device, store=Path(cfg.out) / "latents" / "train")
            val = core_stage.cache_latents(encoder, val_samples, device, keep_maps=True,
                                           store=Path(cfg.out) / "latents" / "val")
            samples.clear()
        _train_decoder(cfg, ck, list(zip(data, kept)), val, done, device, autocast, gen, log, save,
                       resume_from if saved_state and saved_state["stage"] == "decoder" else None)
    final = state.write_checkpoint(run / "checkpoint", source, tcfg, ck.transformer, ck.vae, ck.heads,
                                   ck.prompt_embeds, dtype=SAVE_DTYPES[cfg.save_dtype],
                                   vae_dtype=SAVE_DTYPES[cfg.save_dtype])
    logger.info("trained checkpoint: %s", final)
    return final


def _train_vae(cfg, ck: Checkpoint, samples, vae_frames, done, device, autocast, gen, log, save, resume_from, saved_state):
    vae = ck.vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if resume_from is not None and saved_state["stage"] == "vae":
        state.load_train_state(resume_from, opt, gen)
    bar = _bar(cfg.vae_steps, done, "vae")
    t0 = time.monotonic()
    ema = None
    for step in range(done, cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.vae_steps, cfg.vae_lr, min(cfg.warmup, max(1, cfg.vae_steps // 10)))
        x, weight = vae_stage.vae_batch(samples, cfg.vae_batch, vae_frames, cfg.vae_crop, gen,
                                        cfg.vae_person_share, cfg.vae_video_share, cfg.vae_person_weight)
        with torch.autocast(device_type=device.type, dtype=autocast, enabled=autocast is not None):
            loss, parts = vae_stage.vae_loss(vae, x.to(device), cfg.vae_kl, sample=cfg.vae_sample,
                                             weight=weight.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema = parts["vae_l1"] if ema is None else 0.9 * ema + 0.1 * parts["vae_l1"]
        bar.update(1)
        bar.set_postfix(l1=f"{ema:.4f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vae_steps:
            record = {"step": step + 1, "stage": "vae", "lr": opt.param_groups[0]["lr"],
                      "elapsed_s": round(time.monotonic() - t0, 1), **{k: round(v, 6) for k, v in parts.items()}}
            log.write(record)
            logger.info("vae step %d: l1 %.4f (ema %.4f) kl %.3g", step + 1, parts["vae_l1"], ema, parts["vae_kl"])
        if step + 1 == cfg.vae_steps:
            vae.eval()
            vae_stage.set_latent_stats(vae, samples)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.vae_steps:
            save(step + 1, "vae", opt if step + 1 < cfg.vae_steps else None)
    bar.close()


def _train_core(cfg, ck: Checkpoint, samples, val_samples, done, device, autocast, gen, log, save, resume_from):
    tcfg = ck.config
    encoder = VaeEncoder(ck.vae).to(device)
    t_cache = time.monotonic()
    data = core_stage.cache_latents(encoder, samples, device, store=Path(cfg.out) / "latents" / "train")
    val = core_stage.cache_latents(encoder, val_samples, device, keep_maps=True, store=Path(cfg.out) / "latents" / "val")
    logger.info("latents of %d training and %d validation windows ready in %.1f s", len(data), len(val),
                time.monotonic() - t_cache)
    # Stage 2 needs only the latents: drop the pixels (the caller's list) to free their memory.
    samples.clear()
    val_samples.clear()
    decoder = VaeDecoder(ck.vae).to(device).eval()
    core = ThfmCore(ck.transformer, ck.heads, tcfg.root_joint).to(device).train()
    core.transformer.requires_grad_(True)
    core.heads.requires_grad_(True)
    params = [p for p in core.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume_from is not None:
        state.load_train_state(resume_from, opt, gen)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    first, total = cfg.vae_steps, cfg.vae_steps + cfg.core_steps  # the end of this stage
    prompts = {t: ck.prompt_embeds[t] for t in cfg.tasks}
    bar = _bar(cfg.core_steps, done - first, "core")
    ema: dict[str, float] = {}
    t0 = time.monotonic()
    for step in range(done, total):
        k = step - first
        for g in opt.param_groups:
            g["lr"] = _lr_at(k, cfg.core_steps, cfg.lr, cfg.warmup)
        batch = core_stage.sample_batch(data, prompts, cfg.tasks, cfg.batch, gen)
        loss, per_task = core_stage.batch_loss(core, batch, cfg.task_weights, device, PRECISIONS[cfg.precision])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        _progress(ema, per_task, bar)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            log.write(_loss_record(step + 1, "core", opt, loss, t0, per_task, ema))
            logger.info("core step %d: loss %.4f | %s", step + 1, float(loss.detach()),
                        " ".join(f"{t} {v:.4f}" for t, v in ema.items()))
        if val and ((step + 1) % cfg.val_every == 0 or step + 1 == total):
            metrics = core_stage.validate(core, decoder, val, prompts, cfg.tasks, device, tcfg.height, tcfg.width)
            log.write({"step": step + 1, "stage": "core", "validation": {k: round(v, 6) for k, v in metrics.items()}})
            logger.info("validation at step %d: %s", step + 1, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if cfg.val_data and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == total):
            report = evaluate(ck, cfg.val_data, Path(cfg.out) / "eval" / f"step-{step + 1:07d}", cfg.tasks)
            log.write({"step": step + 1, "stage": "core", "eval": report.overall})
            logger.info("thfm eval at step %d:\n%s", step + 1, report.to_markdown().split("\n\n")[0])
            core.train()
        if (step + 1) % cfg.save_every == 0 or step + 1 == total:
            save(step + 1, "core", opt)
    bar.close()
    core.eval()
    return data, val


def _train_decoder(cfg, ck: Checkpoint, windows, val, done, device, autocast, gen, log, save, resume_from):
    tcfg = ck.config
    first, total = cfg.vae_steps + cfg.core_steps, cfg.vae_steps + cfg.core_steps + cfg.decoder_steps
    core = ThfmCore(ck.transformer, ck.heads, tcfg.root_joint).to(device).eval().requires_grad_(False)
    vae = ck.vae.to(device).eval().requires_grad_(False)  # eval: no dropout; the encoder stays untouched
    decoder = VaeDecoder(vae).to(device)
    params = decoder_stage.decoder_parameters(vae)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    if resume_from is not None:
        state.load_train_state(resume_from, opt, gen)
    prompts = {t: ck.prompt_embeds[t] for t in cfg.tasks if t in DENSE_TASKS}
    if not prompts:
        raise TrainError("--decoder-steps: no dense task is being trained")
    terms = cfg.metric_terms()
    bar = _bar(cfg.decoder_steps, done - first, "decoder")
    ema: dict[str, float] = {}
    t0 = time.monotonic()
    for step in range(done, total):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step - first, cfg.decoder_steps, cfg.decoder_lr, min(cfg.warmup, max(1, cfg.decoder_steps // 10)))
        batch = decoder_stage.adapt_batch(windows, prompts, cfg.decoder_batch, cfg.decoder_crop, gen,
                                          cfg.vae_person_share, cfg.vae_person_weight)
        with torch.autocast(device_type=device.type, dtype=autocast, enabled=autocast is not None):
            loss, per_task = decoder_stage.adapt_loss(decoder, core, batch, device, terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _progress(ema, per_task, bar)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            log.write(_loss_record(step + 1, "decoder", opt, loss, t0, per_task, ema))
            logger.info("decoder step %d: loss %.4f | %s", step + 1, float(loss.detach()),
                        " ".join(f"{t} {v:.4f}" for t, v in ema.items()))
        if step + 1 == total:
            vae.eval().requires_grad_(False)
            if val:
                metrics = core_stage.validate(core, decoder.eval(), val, ck.prompt_embeds,
                                              cfg.tasks, device, tcfg.height, tcfg.width)
                log.write({"step": step + 1, "stage": "decoder", "validation": {k: round(v, 6) for k, v in metrics.items()}})
                logger.info("validation at step %d: %s", step + 1, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if cfg.val_data:
                report = evaluate(ck, cfg.val_data, Path(cfg.out) / "eval" / f"step-{step + 1:07d}", cfg.tasks)
                log.write({"step": step + 1, "stage": "decoder", "eval": report.overall})
                logger.info("thfm eval at step %d:\n%s", step + 1, report.to_markdown().split("\n\n")[0])
        if (step + 1) % cfg.save_every == 0 or step + 1 == total:
            save(step + 1, "decoder", opt)
    bar.close()


def evaluate(ck: Checkpoint, gt_dir: Path, out: Path, tasks: list[str]):
    """`thfm eval` of the model being trained: the in-process pipeline on every clip of gt_dir (its
    videos, at their own frames and resolution), predictions under out/<clip>/, the report as
    out/eval.md and out/eval.json. Returns the evaluation Report."""
    from ..evaluation import evaluate_dirs
    from ..pipeline import ThfmPipeline, write_results
    from ..video import read_video
    from .data import VIDEO_FILE

    pipe = ThfmPipeline(ck)
    for clip in find_clips(gt_dir):
        video = read_video(clip / VIDEO_FILE)
        write_results(pipe.run(video.frames, tasks), out / clip.name)
    report = evaluate_dirs(out, gt_dir, tasks)
    (out / "eval.md").write_text(report.to_markdown())
    (out / "eval.json").write_text(report.to_json())
    return report


def _progress(ema: dict[str, float], per_task: dict[str, float], bar) -> None:
    """One step of a stage that reports a loss per task: the running average and the progress bar."""
    for t, v in per_task.items():
        ema[t] = v if t not in ema else 0.9 * ema[t] + 0.1 * v
    bar.update(1)
    bar.set_postfix({_short(t): f"{v:.3f}" for t, v in ema.items()})


def _loss_record(step: int, stage: str, opt, loss: torch.Tensor, t0: float, per_task: dict[str, float],
                 ema: dict[str, float]) -> dict:
    """The train_log.jsonl line of a logged step."""
    return {"step": step, "stage": stage, "lr": opt.param_groups[0]["lr"], "loss": round(float(loss.detach()), 6),
            "elapsed_s": round(time.monotonic() - t0, 1), "tasks": {t: round(v, 6) for t, v in per_task.items()},
            "tasks_ema": {t: round(v, 6) for t, v in ema.items()}}


def _short(task: str) -> str:
    return {"depth": "dep", "normals": "nrm", "segmentation": "seg", "densepose": "dp",
            "keypoints2d": "kp2", "keypoints3d": "kp3",
            "normals_angle_deg": "nrm_deg", "depth_ssi": "dep_ssi", "matte_1-iou": "seg_1-iou"}[task]
