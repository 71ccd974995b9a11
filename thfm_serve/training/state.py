"""Training checkpoints: the project's checkpoint layout plus `train_state/` to resume from.

Each interval writes `RUN/step-NNNNNNN/`, a complete checkpoint that `load_checkpoint` (and so
`thfm predict`, `thfm export`) reads like any other, with the optimizer and sampler state in
`train_state/` beside it. Everything is safetensors or JSON: the optimizer's tensors are flattened
into one safetensors file and its scalar settings go to JSON, so resuming never unpickles anything.
A checkpoint is written to a temporary folder and renamed, so a run killed mid-write leaves no
half-written step folder behind.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import HEADS_PREFIX, PROMPT_PREFIX, THFM_DIR, THFM_WEIGHTS
from ..config import ThfmConfig

logger = logging.getLogger(__name__)

STATE_DIR = "train_state"
STEP_DIR = re.compile(r"^step-(\d{7})$")
# Parts copied unchanged from the starting checkpoint (training never changes them).
COPIED_PARTS = ("scheduler", "text_encoder", "tokenizer")


def step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:07d}"


def latest_step(run: Path) -> Path | None:
    """The highest complete step folder of a run, or None."""
    if not run.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in run.iterdir()
                   if (m := STEP_DIR.match(p.name)) and (p / STATE_DIR / "state.json").is_file())
    return steps[-1][1] if steps else None


def write_checkpoint(out: Path, source: Path, cfg: ThfmConfig, transformer, vae, heads,
                     prompt_embeds: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                     vae_dtype: torch.dtype = torch.float32) -> Path:
    """A checkpoint in the project's layout; parts training does not touch are copied from `source`.

    dtype: storage precision of the transformer and THFM heads; vae_dtype the VAE's (fp32 in the step
    folders, which stage 1 resumes from; the final checkpoint may store it in half). The prompt
    embeddings stay fp32; the loader casts to the precision it runs in.
    """
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for part in COPIED_PARTS:
        if (source / part).is_dir():
            shutil.copytree(source / part, tmp / part)
    if (source / "model_index.json").is_file():
        shutil.copy2(source / "model_index.json", tmp / "model_index.json")

    _save_module(transformer, tmp / "transformer", dtype)
    _save_module(vae, tmp / "vae", vae_dtype)
    (tmp / THFM_DIR).mkdir()
    (tmp / THFM_DIR / "config.json").write_text(cfg.to_json())
    tensors = {HEADS_PREFIX + k: v.detach().to("cpu", dtype).contiguous() for k, v in heads.state_dict().items()}
    tensors.update({PROMPT_PREFIX + t: e.detach().cpu().float().contiguous() for t, e in prompt_embeds.items()})
    save_file(dict(sorted(tensors.items())), str(tmp / THFM_DIR / THFM_WEIGHTS), metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _save_module(module, path: Path, dtype: torch.dtype) -> None:
    """save_pretrained, then the weight files rewritten in `dtype` (the live training module keeps its
    precision; diffusers' loader casts to the precision it is asked for)."""
    module.save_pretrained(path, safe_serialization=True)
    if dtype == torch.float32:
        return
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            metadata = fh.metadata()
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(f)).items()}
        save_file(tensors, str(f), metadata=metadata)


def save_train_state(ck: Path, state: dict, optimizer: torch.optim.Optimizer | None, gen: torch.Generator) -> None:
    """`ck/train_state/`: state.json (step, stage, settings), optimizer.safetensors, the sampler's RNG."""
    d = ck / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    tensors = {"rng.sampler": gen.get_state()}
    if optimizer is not None:
        opt = optimizer.state_dict()
        for idx, pstate in opt["state"].items():
            for name, value in pstate.items():
                tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        state = dict(state, param_groups=[{k: v for k, v in g.items()} for g in opt["param_groups"]])
    save_file(tensors, str(d / "optimizer.safetensors"))
    (d / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def load_train_state(ck: Path, optimizer: torch.optim.Optimizer | None, gen: torch.Generator) -> dict:
    """Restore what save_train_state wrote; returns state.json's contents."""
    d = ck / STATE_DIR
    state = json.loads((d / "state.json").read_text())
    tensors = load_file(str(d / "optimizer.safetensors"))
    gen.set_state(tensors["rng.sampler"])
    if optimizer is not None and "param_groups" in state:
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                per_param.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    return state


def prune(run: Path, keep: int) -> None:
    """Keep the `keep` most recent step folders of a run."""
    steps = sorted((int(m.group(1)), p) for p in run.iterdir() if (m := STEP_DIR.match(p.name)))
    for _, p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
