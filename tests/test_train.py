"""`thfm train`: targets built from ground truth, a short smoke run (losses fall, the checkpoint loads
and predicts through the normal path), and resuming that reproduces an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from thfm_serve.checkpoint import load_checkpoint
from thfm_serve.config import DENSE_TASKS, TASKS
from thfm_serve.contract.depth import DepthCode
from thfm_serve.errors import ThfmError
from thfm_serve.processing import dense_output
from thfm_serve.synth.dataset import clip_name, read_clip, write_set
from thfm_serve.synth.scene import render_clip
from thfm_serve.training import core_stage
from thfm_serve.training.data import DataError, depth_to_map, load_clip, load_samples
from thfm_serve.training.trainer import TrainConfig, TrainError, train

LOG1P = DepthCode("log1p", 0.5)  # the tiny preset's code


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    # The renderer's own clips, at the tiny preset's grid (9 frames, 64x64).
    write_set(root / "train", clips=2, frames=9, height=64, width=64, seed=0)
    write_set(root / "val", clips=1, frames=9, height=64, width=64, seed=1)
    return root


def test_targets_follow_the_recipe(synth_data):
    (s,) = load_clip(synth_data / "train" / clip_name(0), window=9, height=64, width=64, num_joints=24,
                     depth=LOG1P)
    truth = read_clip(synth_data / "train" / clip_name(0))
    gt = {"normals": truth["normals"]["normals"], "alpha": truth["segmentation"]["alpha"],
          "kp2d": truth["keypoints2d"]["keypoints"], "kp3d": truth["keypoints3d"]["keypoints"]}
    assert s.video.shape == (3, 9, 64, 64) and set(s.maps) == set(DENSE_TASKS) and s.tasks == list(TASKS)
    for m in s.maps.values():
        assert m.shape == (3, 9, 64, 64) and 0.0 <= float(m.min()) and float(m.max()) <= 1.0
    # Normals: [-1, 1] -> [0, 1]; matte and depth repeated over the three channels.
    np.testing.assert_allclose(s.maps["normals"].float().permute(1, 2, 3, 0).numpy() * 2 - 1, gt["normals"], atol=2e-3)
    np.testing.assert_allclose(s.maps["segmentation"][1].float().numpy(), gt["alpha"], atol=1e-3)
    # Keypoints2d normalised by the image size, 3D as given.
    np.testing.assert_allclose(s.keypoints2d.numpy(), gt["kp2d"] / 64.0, atol=1e-6)
    np.testing.assert_allclose(s.keypoints3d.numpy(), gt["kp3d"], atol=1e-6)


@pytest.mark.parametrize("code", [LOG1P, DepthCode("log", 2.0)], ids=["log1p", "log"])
def test_depth_target_inverts_through_the_engine(code):
    """The squash the targets use is undone by the engine's own depth output: what comes back is
    depth over the clip's median foreground depth (computed here directly)."""
    clip = render_clip(3, frames=9, height=64, width=64)
    depth, alpha = clip.depth, clip.alpha
    squashed = depth_to_map(depth, alpha, code)  # [F, H, W]
    maps = torch.from_numpy(np.repeat(squashed[:, None], 3, axis=1))
    relative = dense_output("depth", maps, 64, 64, code)
    median = np.median(depth[alpha > 0.5])
    inside = (squashed > 0) & (squashed < 1)  # the centred code clips depth far from the person
    np.testing.assert_allclose(relative[inside], (depth / median)[inside], rtol=1e-4)
    person = alpha > 0.5  # soft-edge pixels whose depth is the wall's may clip; the body does not
    assert inside[person].mean() > 0.98, inside[person].mean()
    if code.encoding == "log1p":
        np.testing.assert_allclose(relative, depth / median, rtol=1e-4)
    # No surface (infinite depth) is far, the top of the squashed range.
    d = depth.copy()
    d[:, 0, 0] = np.inf
    assert np.all(depth_to_map(d, alpha, code)[:, 0, 0] == 1.0)


def test_centred_depth_code_spreads_the_person_over_the_map():
    """The reason for the centred code: the person's relief gets a usable share of [0, 1]."""
    clip = render_clip(3, frames=9, height=64, width=64)
    person = clip.alpha > 0.5

    def spread(code):
        m = depth_to_map(clip.depth, clip.alpha, code)[person]
        return float(np.percentile(m, 95) - np.percentile(m, 5))

    old, new = spread(LOG1P), spread(DepthCode("log", 2.0))
    assert new > 6 * old, (old, new)


def test_unknown_depth_code_is_refused():
    with pytest.raises(ThfmError, match="unknown depth encoding 'linear'"):
        DepthCode("linear", 1.0)
    with pytest.raises(ThfmError, match="positive"):
        DepthCode("log", 0.0)


def test_bad_ground_truth_is_named(tmp_path):
    write_set(tmp_path, clips=1, frames=9, height=64, width=64)
    clip = tmp_path / clip_name(0)
    np.savez(clip / "keypoints3d.npz", keypoints=np.zeros((9, 17, 3), np.float32))
    with pytest.raises(DataError, match=r"keypoints3d.npz.*\[F, 24, 3\]"):
        load_clip(clip, 9, 64, 64, 24, LOG1P)
    np.savez(clip / "keypoints3d.npz", keypoints=np.zeros((5, 24, 3), np.float32))
    with pytest.raises(DataError, match="5 frames, but the video has 9"):
        load_clip(clip, 9, 64, 64, 24, LOG1P)
    (clip / "keypoints3d.npz").unlink()
    (s,) = load_clip(clip, 9, 64, 64, 24, LOG1P)  # a clip without a task file trains the others
    assert "keypoints3d" not in s.tasks and s.keypoints2d is not None
    with pytest.raises(DataError, match="holds no clips"):
        load_samples(tmp_path / clip_name(0), 9, 64, 64, 24, LOG1P)


def _config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=data / "train", out=out, preset="tiny", vae_steps=0, core_steps=6, batch=6, lr=1e-3, warmup=2,
                save_every=3, keep=5, log_every=1, val_every=1000, threads=2)
    base.update(kw)
    return TrainConfig(**base)


def _training_loss(ck_path: Path, data_root: Path) -> dict[str, float]:
    """Mean loss per task over every training window and task (no sampling)."""
    ck = load_checkpoint(ck_path)
    samples = load_samples(data_root, 9, 64, 64, 24, LOG1P)
    from thfm_serve.model import VaeEncoder

    data = core_stage.cache_latents(VaeEncoder(ck.vae), samples)
    core = ck.core()
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for s in data:
            for t in s.tasks:
                batch = core_stage.Batch([t], s.latent[None], ck.prompt_embeds[t][None], [s])
                pred, kp2d, kp3d = core(batch.latent, batch.text)
                out.setdefault(t, []).append(float(core_stage.row_losses(batch, pred, kp2d, kp3d)[0]))
    return {t: float(np.mean(v)) for t, v in out.items()}


@pytest.fixture(scope="module")
def smoke_run(synth_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train(_config(synth_data, run, val_data=synth_data / "val", vae_steps=2, vae_batch=2, vae_crop=32, core_steps=40,
                  vae_person_share=0.5,
                  save_every=20, log_every=5, val_every=40, save_dtype="fp16"))
    return run


def test_smoke_run_losses_fall(smoke_run, synth_data):
    log = [json.loads(line) for line in (smoke_run / "train_log.jsonl").read_text().splitlines()]
    core = [r for r in log if r["stage"] == "core" and "tasks" in r]
    assert {t for r in core for t in r["tasks"]} == set(TASKS)
    assert [r for r in log if r["stage"] == "vae"], "stage 1 logged nothing"
    val = [r["validation"] for r in log if "validation" in r][-1]
    assert {"segmentation/iou", "keypoints2d/px", "keypoints3d/mpjpe_mm", "depth/map_mae"} <= set(val)
    # `thfm eval` ran at the end on the held-out clips, in the task units of the paper's metrics.
    (report,) = [r["eval"] for r in log if "eval" in r]
    assert set(report) == set(TASKS) and "iou" in report["segmentation"] and "mpjpe_mm" in report["keypoints3d"]
    assert (smoke_run / "eval" / "step-0000042" / "eval.md").is_file()
    # Same VAE before and after stage 2 (step 2 is the end of stage 1): every task's loss falls.
    before = _training_loss(smoke_run / "step-0000002", synth_data / "train")
    after = _training_loss(smoke_run / "checkpoint", synth_data / "train")
    for t in TASKS:
        assert after[t] < 0.8 * before[t], (t, before[t], after[t])


def test_smoke_checkpoint_loads_and_predicts(smoke_run, synth_data, tmp_path):
    from thfm_serve.cli import main

    ck = smoke_run / "checkpoint"
    with safe_open(str(ck / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # --save-dtype fp16
    vae_cfg = json.loads((ck / "vae" / "config.json").read_text())
    assert vae_cfg["latents_mean"] != [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                                       -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
    assert (ck / "text_encoder").is_dir() and (ck / "model_index.json").is_file()
    assert not (ck / "train_state").exists()
    out = tmp_path / "pred"
    assert main(["predict", str(synth_data / "val" / clip_name(0) / "video.mp4"), "--checkpoint", str(ck),
                 "--tasks", "all", "--out", str(out)]) == 0
    with np.load(out / "segmentation.npz") as z:
        assert z["alpha"].shape == (9, 64, 64)
    with np.load(out / "keypoints2d.npz") as z:
        assert z["keypoints"].shape == (9, 24, 2)


def test_resume_reproduces_an_uninterrupted_run(synth_data, tmp_path):
    whole = train(_config(synth_data, tmp_path / "a"))
    run_b = tmp_path / "b"
    train(_config(synth_data, run_b))
    # Interrupted after step 3: the later step folder and the final checkpoint never got written.
    shutil.rmtree(run_b / "step-0000006")
    shutil.rmtree(run_b / "checkpoint")
    resumed = train(_config(synth_data, run_b))
    a, b = load_checkpoint(whole), load_checkpoint(resumed)
    for (name, pa), (_, pb) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
    for (name, pa), (_, pb) in zip(a.heads.state_dict().items(), b.heads.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
    # The latents were encoded once: the resumed run read them back from the run's store.
    assert [p.name.split("-")[0] for p in sorted((run_b / "latents").iterdir())] == ["train", "val"]
    # And the resumed run did continue from step 3 rather than start over.
    steps = [json.loads(x)["step"] for x in (run_b / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 4, 5, 6]


def test_depth_code_chosen_at_training_is_the_checkpoints(synth_data, tmp_path):
    """`--depth-encoding/--depth-scale` retarget depth: the checkpoint records the code, so serving
    and evaluation invert what the core was trained on."""
    from thfm_serve.cli import main

    run = tmp_path / "run"
    assert main(["train", str(synth_data / "train"), "--preset", "tiny", "--out", str(run), "--steps", "2",
                 "--batch", "4", "--save-every", "2", "--val-every", "1000", "--threads", "2",
                 "--depth-encoding", "log", "--depth-scale", "2"]) == 0
    cfg = load_checkpoint(run / "checkpoint").config
    assert cfg.depth_code == DepthCode("log", 2.0)
    assert load_checkpoint(run / "init").config.depth_code == LOG1P  # the preset's own code is unchanged


def test_latent_store_is_read_back_only_for_the_same_encoder_and_pixels(synth_data, tmp_path, caplog):
    from thfm_serve.checkpoint import init_checkpoint
    from thfm_serve.model import VaeEncoder

    ck = load_checkpoint(init_checkpoint("tiny", tmp_path / "ck"))
    samples = load_samples(synth_data / "train", 9, 64, 64, 24, LOG1P)
    encoder = VaeEncoder(ck.vae)
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    store = tmp_path / "latents" / "train"
    with caplog.at_level("INFO", logger=core_stage.logger.name):
        first = core_stage.cache_latents(encoder, samples, store=store)
    assert len(calls) == len(samples) and len(list(store.parent.glob("train-*.pt"))) == 1
    # the encoding says how far it is (it runs for up to an hour before the first step on a CPU)
    assert f"latents: {len(samples)} of {len(samples)} windows encoded" in caplog.text
    again = core_stage.cache_latents(encoder, samples, store=store)
    assert len(calls) == len(samples)  # read back, not encoded again
    for a, b in zip(first, again):
        torch.testing.assert_close(a.latent, b.latent, rtol=0, atol=0)
        for t in a.targets:
            torch.testing.assert_close(a.targets[t], b.targets[t], rtol=0, atol=0)
        torch.testing.assert_close(a.keypoints2d, b.keypoints2d)
    # Other pixels (one window's video changed) or other weights: encoded again, the old store replaced.
    samples[0].video = samples[0].video.clone()
    samples[0].video[:, 0] = 0.0
    core_stage.cache_latents(encoder, samples, store=store)
    assert len(calls) == 2 * len(samples)
    with torch.no_grad():
        next(ck.vae.parameters()).add_(0.01)
    changed = core_stage.cache_latents(encoder, samples, store=store)
    assert len(calls) == 3 * len(samples) and len(list(store.parent.glob("train-*.pt"))) == 1
    assert not torch.equal(changed[1].latent, first[1].latent)
    # The decoder's weights (all that stage 3 trains) do not matter to the latents: read back.
    with torch.no_grad():
        ck.vae.decoder.conv_out.weight.add_(0.01)
        ck.vae.post_quant_conv.weight.add_(0.01)
    core_stage.cache_latents(encoder, samples, store=store)
    assert len(calls) == 3 * len(samples)
    # The latent statistics do (they are buffers outside the state dict): encoded again.
    encoder.mean += 0.5
    core_stage.cache_latents(encoder, samples, store=store)
    assert len(calls) == 4 * len(samples)


def test_bad_settings_are_refused(synth_data, tmp_path):
    with pytest.raises(TrainError, match="exactly one of --checkpoint"):
        train(_config(synth_data, tmp_path, checkpoint=tmp_path))
    with pytest.raises(TrainError, match="4n\\+1"):
        train(_config(synth_data, tmp_path, vae_frames=4))
    with pytest.raises(TrainError, match="vae-person-share"):
        train(_config(synth_data, tmp_path, vae_person_share=1.5))
    with pytest.raises(TrainError, match="vae-video-share"):
        train(_config(synth_data, tmp_path, vae_video_share=-0.1))
    with pytest.raises(TrainError, match="vae-person-weight"):
        train(_config(synth_data, tmp_path, vae_person_weight=-1.0))
    with pytest.raises(TrainError, match="decoder-crop 40 must be a multiple of 16"):
        train(_config(synth_data, tmp_path, decoder_steps=2, decoder_crop=40))
    with pytest.raises(TrainError, match="load_workers must be >= 1"):
        train(_config(synth_data, tmp_path, load_workers=0))


def test_clips_read_in_threads_give_the_same_windows_in_order(synth_data):
    one = load_samples(synth_data / "train", 5, 64, 64, 24, LOG1P)  # 9 frames in windows of 5: 2 per clip
    many = load_samples(synth_data / "train", 5, 64, 64, 24, LOG1P, workers=3)
    assert [(s.clip, s.start) for s in many] == [(s.clip, s.start) for s in one]
    assert len({s.clip for s in one}) == 2 and len(one) > 2
    for a, b in zip(one, many):
        assert torch.equal(a.video, b.video) and a.maps.keys() == b.maps.keys()
        assert all(torch.equal(a.maps[t], b.maps[t]) for t in a.maps)
        assert torch.equal(a.keypoints2d, b.keypoints2d) and torch.equal(a.keypoints3d, b.keypoints3d)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        load_samples(synth_data / "train", 5, 64, 64, 24, LOG1P, workers=0)


def test_wan_vae_is_never_trained(synth_data, tmp_path, monkeypatch):
    """Stages 1 and 3 train the VAE; THFM keeps a real Wan2.1 VAE frozen, so both refuse one (here the
    tiny preset's VAE stands in for Wan's shape)."""
    from thfm_serve.training import trainer

    monkeypatch.setattr(trainer, "WAN_VAE_BASE_DIM", 8)
    for kw in (dict(vae_steps=2), dict(decoder_steps=2)):
        with pytest.raises(TrainError, match="keeps the pretrained Wan VAE frozen"):
            train(_config(synth_data, tmp_path / str(len(kw)), **kw))


def test_vae_person_weight_follows_the_matte(synth_data, monkeypatch):
    """The per-pixel loss weight is 1 + w * the person's matte, crop for crop: heavier on the person,
    1 on the background; and the weighted loss is a mean error that weighs the person's pixels more."""
    from thfm_serve.training import vae_stage

    (s,) = load_samples(synth_data / "train", 9, 64, 64, 24, LOG1P)[:1]
    gen = torch.Generator().manual_seed(1)
    x, matte = vae_stage.vae_item(s, "depth", 5, None, gen)
    assert matte.shape == (1, 5, 64, 64) and 0 < float(matte.mean()) < 0.5  # a person, not the frame
    mattes = []
    real = vae_stage.vae_item
    monkeypatch.setattr(vae_stage, "vae_item", lambda *a, **k: (out := real(*a, **k), mattes.append(out[1]))[0])
    batch, weight = vae_stage.vae_batch([s], 6, 5, 32, gen, person_share=1.0, person_weight=4.0)
    assert float(weight.min()) == 1.0 and float(weight.max()) > 2.0  # person-centred crops hold the person
    assert torch.equal(weight, 1.0 + 4.0 * torch.stack(mattes))

    from types import SimpleNamespace

    class ZeroVae(torch.nn.Module):  # reconstructs everything as 0: the error is the target itself
        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Identity()
            self.config = SimpleNamespace(patch_size=None)

        def encode(self, x):
            zero = x * 0
            return SimpleNamespace(latent_dist=SimpleNamespace(
                mode=lambda: zero, sample=lambda generator=None: zero, kl=lambda: torch.zeros(x.shape[0])))

        def decode(self, z):
            return SimpleNamespace(sample=self.decoder(z).clamp(-1, 1))

    target = torch.ones(1, 3, 1, 2, 2)
    w = torch.tensor([1.0, 1.0, 1.0, 4.0]).reshape(1, 1, 1, 2, 2)
    loss, parts = vae_stage.vae_loss(ZeroVae(), target, 0.0, weight=w)
    assert abs(float(loss) - 1.0) < 1e-6  # uniform error: weighting keeps it a mean error
    target[..., 1, 1] = 3.0  # larger error on the heavy pixel
    loss, _ = vae_stage.vae_loss(ZeroVae(), target, 0.0, weight=w)
    assert abs(float(loss) - (3 * 1 + 4 * 3) / 7) < 1e-5


def test_vae_video_share_sets_how_many_rows_are_video(synth_data, monkeypatch):
    from thfm_serve.training import vae_stage

    samples = load_samples(synth_data / "train", 9, 64, 64, 24, LOG1P)
    gen = torch.Generator().manual_seed(0)
    sources: list[str] = []
    real = vae_stage.vae_item
    monkeypatch.setattr(vae_stage, "vae_item", lambda s, source, *a, **k: sources.append(source) or real(s, source, *a, **k))
    for share, video_rows in ((0.25, 2), (0.5, 4), (0.1, 1), (0.0, 0), (1.0, 8)):
        sources.clear()
        batch, weight = vae_stage.vae_batch(samples, 8, 5, 32, gen, video_share=share)
        assert batch.shape == (8, 3, 5, 32, 32) and weight.shape == (8, 1, 5, 32, 32)
        assert bool((weight == 1).all())  # no person weight asked for
        assert sources.count("video") == video_rows, share
        assert set(sources) - {"video"} <= set(samples[0].maps)


def test_person_crops_hold_a_visible_joint(synth_data):
    """Person-centred VAE crops contain a visible joint of the person (the jitter is at most a quarter
    of the crop); uniform crops of the same clips often do not."""
    from thfm_serve.training import vae_stage

    samples = load_samples(synth_data / "train", 9, 64, 64, 24, LOG1P)
    gen = torch.Generator().manual_seed(0)

    def holds_joint(share: float) -> list[bool]:
        out = []
        for i in range(60):
            s = samples[i % len(samples)]
            t0, frames, crop = 2, 5, 16
            y0, x0 = vae_stage.crop_origin(s, t0, frames, crop, 64, 64, gen, share)
            kp = s.keypoints2d[t0 : t0 + frames].reshape(-1, 2) * 64
            vis = s.visibility[t0 : t0 + frames].reshape(-1) > 0
            inside = (kp[:, 0] >= x0) & (kp[:, 0] < x0 + crop) & (kp[:, 1] >= y0) & (kp[:, 1] < y0 + crop)
            assert 0 <= y0 <= 64 - crop and 0 <= x0 <= 64 - crop
            out.append(bool((inside & vis).any()))
        return out

    assert all(holds_joint(1.0))
    assert not all(holds_joint(0.0))


def test_lowering_vae_steps_on_resume_finishes_stage_one(synth_data, tmp_path):
    """Stopped mid stage 1 and resumed with --vae-steps at the step it reached: the latent statistics
    stage 1 writes at its end are still measured before stage 2."""
    run = tmp_path / "r"
    cfg = dict(vae_steps=2, vae_batch=1, vae_crop=32, core_steps=0, save_every=1)
    train(_config(synth_data, run, **cfg))
    shutil.rmtree(run / "step-0000002")
    shutil.rmtree(run / "checkpoint")
    stopped = json.loads((run / "step-0000001" / "vae" / "config.json").read_text())["latents_mean"]
    final = train(_config(synth_data, run, **dict(cfg, vae_steps=1, core_steps=2)))
    measured = json.loads((final / "vae" / "config.json").read_text())["latents_mean"]
    assert measured != stopped
    steps = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3]


def test_vae_loss_reaches_pixels_the_decoder_overshoots():
    """decode() clamps to [-1, 1]; the training loss sees the decoder's unclamped output, so pixels it
    overshoots still get a gradient (on the clamped output they would not)."""
    from diffusers import AutoencoderKLWan

    from thfm_serve.config import PRESETS
    from thfm_serve.training import vae_stage

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**PRESETS["tiny"].vae)
    z = (torch.randn(1, 16, 3, 4, 4) * 3).requires_grad_(True)
    raw = vae_stage.decode_unclamped(vae, z)
    assert raw.shape == vae.decode(z).sample.shape == (1, 3, 9, 32, 32)
    assert torch.equal(raw.clamp(-1, 1), vae.decode(z).sample)
    over = raw.detach().abs() > 1
    assert over.any()  # random weights and large latents overshoot somewhere
    clamped = vae.decode(z).sample
    (g_clamped,) = torch.autograd.grad((clamped * over).sum(), z)
    (g_raw,) = torch.autograd.grad((vae_stage.decode_unclamped(vae, z) * over).sum(), z)
    assert float(g_clamped.abs().max()) == 0.0 and float(g_raw.abs().max()) > 0.0


def test_vae_crops_cover_the_whole_window_by_default(synth_data, tmp_path, monkeypatch, caplog):
    """The causal VAE decodes a window's later latent frames from the earlier ones' caches: crops span
    the model window unless asked otherwise, and a shorter crop is warned about."""
    from thfm_serve.training import vae_stage

    seen = []
    real = vae_stage.vae_batch
    monkeypatch.setattr(vae_stage, "vae_batch", lambda s, b, frames, *a, **k: (seen.append(frames), real(s, b, frames, *a, **k))[1])
    cfg = dict(vae_steps=1, vae_batch=1, vae_crop=32, core_steps=0, save_every=1)
    train(_config(synth_data, tmp_path / "a", **cfg))
    assert seen == [9] and "not trained" not in caplog.text  # the tiny preset's window
    train(_config(synth_data, tmp_path / "b", vae_frames=5, **cfg))
    assert seen == [9, 5] and "later latent frames are not trained" in caplog.text


def _decoded_error(ck_path: Path, data_root: Path) -> float:
    """Mean absolute error, over every training window and dense task, between the ground-truth map
    and the decoder's drawing of the core's prediction (the whole frame, the served path's modules)."""
    ck = load_checkpoint(ck_path)
    samples = load_samples(data_root, 9, 64, 64, 24, LOG1P)
    encoder, decoder, core = ck.vae_encoder(), ck.vae_decoder(), ck.core()
    errs = []
    with torch.no_grad():
        for s in samples:
            latent = encoder(s.video.float()[None])
            for t in DENSE_TASKS:
                pred = core(latent, ck.prompt_embeds[t][None])[0]
                errs.append(float((decoder(pred)[0] - s.maps[t].float()).abs().mean()))
    return float(np.mean(errs))


def test_decoder_stage_fits_the_cores_latents_and_leaves_the_rest(synth_data, tmp_path):
    """Stage 3 lowers the error of the decoded core predictions against ground truth, trains nothing
    but the decoder (the encoder, its latent statistics, the core and the heads are bit-identical),
    and resumes like the other stages."""
    kw = dict(core_steps=6, decoder_steps=60, decoder_batch=2, decoder_crop=32, decoder_lr=3e-3,
              save_every=30, keep=10, vae_person_share=0.5, vae_person_weight=2.0)
    final = train(_config(synth_data, tmp_path / "a", **kw))
    before, after = load_checkpoint(tmp_path / "a" / "step-0000006"), load_checkpoint(final)
    changed = {n for n, p in after.vae.state_dict().items()
               if not torch.equal(p.float(), before.vae.state_dict()[n].float())}
    assert changed and all(n.startswith(("decoder.", "post_quant_conv.")) for n in changed), sorted(changed)[:5]
    assert after.vae.config.latents_mean == before.vae.config.latents_mean
    for a, b in ((after.transformer, before.transformer), (after.heads, before.heads)):
        for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(pa, pb), name
    e_before = _decoded_error(tmp_path / "a" / "step-0000006", synth_data / "train")
    e_after = _decoded_error(final, synth_data / "train")
    assert e_after < 0.8 * e_before, (e_before, e_after)
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"core", "decoder"}
    # Interrupted in stage 3 (after step 60): resuming reads the stage 2 latents back and ends where an
    # uninterrupted run does.
    run_b = tmp_path / "b"
    train(_config(synth_data, run_b, **kw))
    shutil.rmtree(run_b / "step-0000066")
    shutil.rmtree(run_b / "checkpoint")
    resumed = load_checkpoint(train(_config(synth_data, run_b, **kw)))
    whole = load_checkpoint(final)
    for (name, pa), (_, pb) in zip(whole.vae.state_dict().items(), resumed.vae.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
    # Stage 3 alone on a finished checkpoint (no core steps): its core stays as given.
    alone = load_checkpoint(train(_config(synth_data, tmp_path / "c", checkpoint=tmp_path / "a" / "step-0000006",
                                          preset=None, core_steps=0, decoder_steps=3, decoder_batch=2,
                                          decoder_crop=32)))
    assert not torch.equal(alone.vae.decoder.conv_out.weight, before.vae.decoder.conv_out.weight)
    for (name, pa), (_, pb) in zip(alone.transformer.state_dict().items(), before.transformer.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_vae_roundtrip_scores_depth_like_eval_for_either_code(synth_data, tmp_path):
    """perf/vae_roundtrip.py's depth scoring: a VAE whose round trip is exact scores abs-rel 0 with
    either code, the constant baseline on the same pixels does not."""
    from perfscripts import load_perf_script

    rt = load_perf_script("vae_roundtrip")
    run = train(_config(synth_data, tmp_path / "run", core_steps=1, save_every=1))

    class Encoder(torch.nn.Module):  # with Decoder: a VAE whose round trip is exact
        def __init__(self, vae):
            super().__init__()

        def forward(self, x):  # [-1, 1] in, kept as the "latent"
            return x

    class Decoder(Encoder):
        def forward(self, z):  # back to the [0, 1] maps the real decoder returns
            return (z + 1.0) * 0.5

    rt.VaeEncoder, rt.VaeDecoder = Encoder, Decoder
    for code in (LOG1P, DepthCode("log", 2.0)):
        res = rt.roundtrip(str(run), str(synth_data / "val"), 1, code, ["depth"])
        assert res["depth/abs_rel_on_person"] < 1e-3, res
        assert res["depth/abs_rel_constant_baseline"] > 0.01, res
