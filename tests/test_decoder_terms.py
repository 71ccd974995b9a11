"""Stage 3's terms in task units (training.decoder_stage.MetricTerms), each checked against the
metric `thfm eval` computes on the same numbers (thfm_serve.evaluation), and their wiring into a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from thfm_serve.evaluation import align_depth, angular_errors, matte_metrics
from thfm_serve.synth.dataset import write_set
from thfm_serve.training.decoder_stage import MetricTerms, depth_ssi, matte_soft_iou, normals_angle
from thfm_serve.training.trainer import TrainConfig, TrainError, train


def _person(t: int = 3, h: int = 12, w: int = 12) -> torch.Tensor:
    m = torch.zeros(t, h, w, dtype=torch.bool)
    m[:, 2:10, 3:9] = True
    return m


def test_normals_angle_is_the_metrics_angle_whatever_the_length():
    gen = torch.Generator().manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(3, 3, 12, 12, generator=gen), dim=0)
    drawn = torch.randn(3, 3, 12, 12, generator=gen) * 0.3
    person = _person()
    got = math.degrees(float(normals_angle(drawn, target, person)))
    # thfm eval's angle: arccos of the normalised dot product, per pixel of the person
    want = angular_errors(drawn.permute(1, 2, 3, 0).numpy(), target.permute(1, 2, 3, 0).numpy())[person.numpy()].mean()
    assert got == pytest.approx(float(want), abs=1e-3)
    # Length does not matter, direction does; a drawing equal to the truth scores 0 with finite gradients.
    assert float(normals_angle(drawn * 5.0, target, person)) == pytest.approx(math.radians(got), abs=1e-5)
    same = target.clone().requires_grad_(True)
    zero = normals_angle(same, target, person)
    zero.backward()
    assert float(zero.detach()) < 1e-4 and torch.isfinite(same.grad).all()
    # Pixels off the person are not scored; a crop without a person has no term.
    off = drawn.clone()
    off[:, ~person] = -target[:, ~person]
    assert float(normals_angle(off, target, person)) == pytest.approx(math.radians(got), abs=1e-5)
    assert normals_angle(drawn, target, torch.zeros_like(person)) is None


def test_depth_ssi_is_the_residual_of_the_metrics_alignment():
    gen = torch.Generator().manual_seed(1)
    true = torch.rand(3, 12, 12, generator=gen)
    person = _person()
    # Any scale and shift of the truth costs nothing: the depth metric aligns them away.
    assert float(depth_ssi((3.0 * true - 0.7).expand(3, -1, -1, -1), true.expand(3, -1, -1, -1), person)) < 1e-5
    drawn = true + 0.4 * torch.rand(3, 12, 12, generator=gen)
    got = float(depth_ssi(drawn.expand(3, -1, -1, -1), true.expand(3, -1, -1, -1), person))
    want = np.mean([np.abs(align_depth(drawn[f].numpy(), true[f].numpy(), person[f].numpy())[person[f].numpy()]
                           - true[f].numpy()[person[f].numpy()]).mean() for f in range(3)])
    assert got == pytest.approx(float(want), rel=1e-4)
    # A flat drawing scores the constant's error (the truth's mean absolute deviation on the person).
    flat = torch.full((3, 3, 12, 12), 0.2)
    mad = np.mean([np.abs(true[f][person[f]] - true[f][person[f]].mean()).mean().item() for f in range(3)])
    assert float(depth_ssi(flat, true.expand(3, -1, -1, -1), person)) == pytest.approx(mad, rel=1e-3)
    assert depth_ssi(drawn.expand(3, -1, -1, -1), true.expand(3, -1, -1, -1), torch.zeros_like(person)) is None


def test_matte_soft_iou_matches_the_metrics_iou_on_hard_mattes():
    gen = torch.Generator().manual_seed(2)
    true = (torch.rand(3, 12, 12, generator=gen) > 0.5).float()
    drawn = (torch.rand(3, 12, 12, generator=gen) > 0.4).float()
    to_code = lambda m: (m * 2.0 - 1.0).expand(3, -1, -1, -1)  # noqa: E731 - maps in [-1, 1], 3 channels
    got = 1.0 - float(matte_soft_iou(to_code(drawn), to_code(true)))
    assert got == pytest.approx(matte_metrics(drawn.numpy(), true.numpy())["iou"], abs=1e-6)
    # Overshoot past the matte's range is clamped, not rewarded; an empty truth has no term.
    assert float(matte_soft_iou(to_code(true) * 3.0, to_code(true))) == pytest.approx(0.0, abs=1e-6)
    assert matte_soft_iou(to_code(drawn), to_code(torch.zeros_like(true))) is None


def test_metric_terms_refuse_negative_or_non_finite_weights():
    with pytest.raises(ValueError, match="normals_angle"):
        MetricTerms(normals_angle=-1.0)
    with pytest.raises(ValueError, match="depth_ssi"):
        MetricTerms(depth_ssi=float("nan"))
    with pytest.raises(TrainError, match="--decoder-angle-weight"):
        TrainConfig(data="d", out="o", preset="tiny", decoder_iou_weight=-0.5).validate()


def test_stage3_with_metric_terms_logs_them(tmp_path):
    """A short stage 3 with every term on: each dense task's term is in the log, in its units."""
    write_set(tmp_path / "train", clips=1, frames=9, height=64, width=64, seed=0)
    cfg = TrainConfig(data=tmp_path / "train", out=tmp_path / "run", preset="tiny", vae_steps=0, core_steps=2,
                      batch=4, lr=1e-3, warmup=1, decoder_steps=4, decoder_batch=4, decoder_crop=32,
                      vae_person_share=1.0, decoder_angle_weight=0.5, decoder_ssi_weight=1.0,
                      decoder_iou_weight=1.0, save_every=100, log_every=1, threads=2, seed=3)
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    seen = {k for r in rows if r.get("stage") == "decoder" for k in r.get("tasks", {})}
    assert {"normals_angle_deg", "depth_ssi", "matte_1-iou"} <= seen, seen
    angles = [r["tasks"]["normals_angle_deg"] for r in rows if "normals_angle_deg" in r.get("tasks", {})]
    assert all(0.0 <= a <= 180.0 for a in angles), angles
