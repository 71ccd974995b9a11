"""Checkpoint layout: written by `thfm init-checkpoint`, loadable by plain diffusers/transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thfm_serve.checkpoint import THFM_DIR, THFM_WEIGHTS, init_checkpoint, load_checkpoint
from thfm_serve.cli import main
from thfm_serve.config import PRESETS, TASKS
from thfm_serve.errors import CheckpointError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_no_pickle(tiny_checkpoint):
    names = set(_files(tiny_checkpoint))
    for part in ("transformer", "vae", "text_encoder"):
        assert f"{part}/config.json" in names
    assert "tokenizer/tokenizer.json" in names
    assert {"model_index.json", "scheduler/scheduler_config.json", "thfm/config.json", "thfm/thfm.safetensors"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    cfg = json.loads((tiny_checkpoint / THFM_DIR / "config.json").read_text())
    assert set(cfg["tasks"]) == set(TASKS) and len(cfg["joint_names"]) == 24
    assert (cfg["frames"] - 1) % 4 == 0 and cfg["height"] % 16 == 0 and cfg["width"] % 16 == 0


def test_parts_load_with_plain_diffusers_and_transformers(tiny_checkpoint):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    tr = WanTransformer3DModel.from_pretrained(tiny_checkpoint, subfolder="transformer")
    vae = AutoencoderKLWan.from_pretrained(tiny_checkpoint, subfolder="vae")
    te = UMT5EncoderModel.from_pretrained(tiny_checkpoint, subfolder="text_encoder")
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint, subfolder="tokenizer")
    ids = tok(["Estimate the depth"], return_tensors="pt")
    assert te(**ids).last_hidden_state.shape[-1] == tr.config.text_dim
    assert tr.config.in_channels == vae.config.z_dim == 16


def test_cached_prompt_embeddings_equal_text_encoder_output(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    for task, prompt in ck.config.tasks.items():
        assert torch.equal(ck.encode_prompt(prompt), ck.task_embedding(task))
    free = ck.encode_prompt("segment the person please")
    assert free.shape == (ck.config.text_len, ck.config.text_dim)
    assert not torch.equal(free, ck.task_embedding("segmentation"))


def test_same_seed_same_files_and_other_seed_differs(tmp_path, tiny_checkpoint):
    again = init_checkpoint("tiny", tmp_path / "again", seed=0)
    other = init_checkpoint("tiny", tmp_path / "other", seed=1)
    assert _files(again) == _files(tiny_checkpoint)
    a, b = _files(again), _files(other)
    assert a["transformer/diffusion_pytorch_model.safetensors"] != b["transformer/diffusion_pytorch_model.safetensors"]
    assert a[f"{THFM_DIR}/{THFM_WEIGHTS}"] != b[f"{THFM_DIR}/{THFM_WEIGHTS}"]


def test_save_then_load_is_bit_exact(tmp_path, tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    out = tmp_path / "resaved"
    shutil.copytree(tiny_checkpoint, out)
    ck.transformer.save_pretrained(out / "transformer")
    ck.vae.save_pretrained(out / "vae")
    back = load_checkpoint(out)
    for a, b in ((ck.transformer, back.transformer), (ck.vae, back.vae), (ck.heads, back.heads)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    stored = load_file(str(tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(stored[k], ck.transformer.state_dict()[k]) for k in stored)


@pytest.mark.parametrize("remove", ["transformer", "vae", "thfm/config.json", "thfm/thfm.safetensors"])
def test_missing_part_is_a_clear_error(tmp_path, tiny_checkpoint, remove):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    target = ck / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError, match=remove.split("/")[-1].split(".")[0]):
        load_checkpoint(ck)


def test_text_encoder_is_optional(tmp_path, tiny_checkpoint):
    ck_dir = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck_dir)
    shutil.rmtree(ck_dir / "text_encoder")
    shutil.rmtree(ck_dir / "tokenizer")
    ck = load_checkpoint(ck_dir)
    assert ck.text_encoder is None and ck.task_embedding("depth").shape == (16, 32)
    with pytest.raises(CheckpointError, match="no text_encoder"):
        ck.encode_prompt("anything")


def test_corrupt_and_mismatched_checkpoints(tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / THFM_DIR / THFM_WEIGHTS).write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(bad)

    mism = tmp_path / "mism"
    shutil.copytree(tiny_checkpoint, mism)
    cfg = json.loads((mism / THFM_DIR / "config.json").read_text())
    cfg["joint_names"] = cfg["joint_names"][:14]  # heads were trained for 24 joints
    (mism / THFM_DIR / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="heads do not match"):
        load_checkpoint(mism)

    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_checkpoint, trunc)
    w = trunc / "transformer" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="transformer"):
        load_checkpoint(trunc)


def test_cli_init_checkpoint_and_refusals(tmp_path, caplog):
    assert main(["init-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "ck"), "--seed", "3"]) == 0
    assert (tmp_path / "ck" / THFM_DIR / THFM_WEIGHTS).is_file()
    assert main(["init-checkpoint", "--preset", "wan2.1-14b", "--out", str(tmp_path / "big")]) == 2
    assert "too large" in caplog.text
    assert not PRESETS["wan2.1-14b"].instantiable


@pytest.mark.slow
def test_wan13b_checkpoint_has_real_shapes(tmp_path):
    from diffusers import WanTransformer3DModel

    ck = init_checkpoint("wan2.1-1.3b", tmp_path / "ck13", seed=0)
    assert not (ck / "text_encoder").exists()
    tr = WanTransformer3DModel.from_pretrained(ck, subfolder="transformer")
    n = sum(p.numel() for p in tr.parameters())
    assert 1.3e9 < n < 1.5e9
    loaded = load_checkpoint(ck)
    assert loaded.task_embedding("depth").shape == (512, 4096)
