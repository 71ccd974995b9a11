"""Checkpoint layout, loading and random-weight initialisation.

Layout (a diffusers Wan2.1 directory plus THFM's own folder)::

    CK/model_index.json                 WanPipeline index
    CK/scheduler/                       unused at inference (one step, timestep 0), kept for diffusers
    CK/transformer/                     WanTransformer3DModel (config.json + safetensors)
    CK/vae/                             AutoencoderKLWan
    CK/text_encoder/, CK/tokenizer/     UMT5 encoder and tokenizer (optional once prompts are cached)
    CK/thfm/config.json                 tasks, prompts, joint set, default frames and resolution
    CK/thfm/thfm.safetensors            learnable token, heads, cached prompt embeddings

Weights are safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import PRESETS, TASKS, ThfmConfig
from .errors import CheckpointError, TaskError
from .model import ThfmCore, ThfmHeads, VaeDecoder, VaeEncoder

logger = logging.getLogger(__name__)

THFM_DIR = "thfm"
THFM_WEIGHTS = "thfm.safetensors"
PROMPT_PREFIX = "prompt_embeds."
HEADS_PREFIX = "heads."
REQUIRED_PARTS = ("transformer", "vae")
# The small THFM (the `small` preset's shape) trained with `thfm train` on the renderer's clips and shipped
# inside the package (docs/training.md: command, data seeds, time, held-out metrics). An ordinary
# checkpoint directory: it loads through load_checkpoint like any other.
TRAINED_SMALL = Path(__file__).resolve().parent / "weights" / "thfm-small"


@dataclass
class Checkpoint:
    path: Path
    config: ThfmConfig
    transformer: torch.nn.Module
    vae: torch.nn.Module
    heads: ThfmHeads
    prompt_embeds: dict[str, torch.Tensor]  # task -> [text_len, text_dim] float32
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    _core: ThfmCore | None = field(default=None, repr=False)

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASKS if t in self.config.tasks]

    def core(self) -> ThfmCore:
        if self._core is None:
            self._core = ThfmCore(self.transformer, self.heads, self.config.root_joint).eval()
        return self._core

    def vae_encoder(self) -> VaeEncoder:
        return VaeEncoder(self.vae).eval()

    def vae_decoder(self) -> VaeDecoder:
        return VaeDecoder(self.vae).eval()

    def task_embedding(self, task: str) -> torch.Tensor:
        if task not in self.prompt_embeds:
            raise TaskError(f"checkpoint {self.path} has no cached prompt embedding for task {task!r}")
        return self.prompt_embeds[task]

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Free-form prompt -> [text_len, text_dim]; needs the checkpoint's text encoder."""
        if self.text_encoder is None or self.tokenizer is None:
            raise CheckpointError(
                f"checkpoint {self.path} has no text_encoder/tokenizer: only the cached task prompts "
                f"({', '.join(self.tasks)}) can be used"
            )
        return encode_prompt(self.text_encoder, self.tokenizer, prompt, self.config.text_len)


@torch.no_grad()
def encode_prompt(text_encoder, tokenizer, prompt: str, text_len: int) -> torch.Tensor:
    """UMT5 prompt embedding as WanPipeline computes it: real tokens kept, the rest zeroed."""
    ids = tokenizer(
        [prompt], padding="max_length", max_length=text_len, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    hidden = text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state  # [1, L, D]
    length = int(ids.attention_mask.sum())
    out = torch.zeros(text_len, hidden.shape[-1], dtype=torch.float32)
    out[:length] = hidden[0, :length].float()
    return out


# --- loading ----------------------------------------------------------------------------------

def _require_dir(ck: Path, part: str) -> Path:
    d = ck / part
    if not (d / "config.json").is_file():
        raise CheckpointError(f"checkpoint {ck} is missing its {part}/ part ({d / 'config.json'} not found)")
    return d


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, text_encoder: bool = True) -> Checkpoint:
    """Load a THFM checkpoint; every missing or mismatched part is a CheckpointError."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    ck = Path(path)
    if not ck.is_dir():
        raise CheckpointError(f"checkpoint directory {ck} does not exist")
    for part in REQUIRED_PARTS:
        _require_dir(ck, part)
    cfg = ThfmConfig.load(ck / THFM_DIR / "config.json")
    weights = ck / THFM_DIR / THFM_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {ck} is missing {weights}")

    try:
        # use_safetensors=True: without it diffusers falls back to torch.load (pickle) when a part
        # has only a .bin file ("Defaulting to unsafe serialization"); a checkpoint must not run code.
        transformer = WanTransformer3DModel.from_pretrained(ck, subfolder="transformer", torch_dtype=dtype,
                                                            use_safetensors=True)
        vae = AutoencoderKLWan.from_pretrained(ck, subfolder="vae", torch_dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ck}: cannot load the Wan transformer/VAE: {_first_line(e)}") from None
    _check_compatible(ck, cfg, transformer, vae)

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {_first_line(e)}") from None
    heads = ThfmHeads(transformer.config.num_attention_heads * transformer.config.attention_head_dim, cfg)
    head_state = {k[len(HEADS_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEADS_PREFIX)}
    try:
        heads.load_state_dict(head_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: THFM heads do not match the config: {_first_line(e)}") from None
    heads.to(dtype)
    prompts = {k[len(PROMPT_PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(PROMPT_PREFIX)}
    missing = [t for t in cfg.tasks if t not in prompts]
    if missing:
        raise CheckpointError(f"{weights} lacks cached prompt embeddings for tasks {missing}")
    for task, emb in prompts.items():
        if tuple(emb.shape) != (cfg.text_len, cfg.text_dim):
            raise CheckpointError(
                f"{weights}: prompt embedding for {task!r} has shape {tuple(emb.shape)}, "
                f"expected ({cfg.text_len}, {cfg.text_dim})"
            )

    te = tok = None
    if text_encoder and (ck / "text_encoder" / "config.json").is_file() and (ck / "tokenizer").is_dir():
        from transformers import AutoTokenizer, UMT5EncoderModel

        try:
            te = UMT5EncoderModel.from_pretrained(ck, subfolder="text_encoder", dtype=torch.float32,
                                                  use_safetensors=True).eval()
            tok = AutoTokenizer.from_pretrained(ck, subfolder="tokenizer")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ck}: cannot load text_encoder/tokenizer: {_first_line(e)}") from None

    transformer.eval()
    vae.eval()
    return Checkpoint(ck, cfg, transformer, vae, heads.eval(), prompts, te, tok)


def _check_compatible(ck: Path, cfg: ThfmConfig, transformer, vae) -> None:
    tc, vc = transformer.config, vae.config
    if tc.in_channels != vc.z_dim or tc.out_channels != vc.z_dim:
        raise CheckpointError(
            f"checkpoint {ck}: transformer channels ({tc.in_channels} in, {tc.out_channels} out) do not "
            f"match the VAE latent channels ({vc.z_dim})"
        )
    if tc.text_dim != cfg.text_dim:
        raise CheckpointError(f"checkpoint {ck}: transformer text_dim {tc.text_dim} != thfm text_dim {cfg.text_dim}")
    if tuple(tc.patch_size) != (1, 2, 2):
        raise CheckpointError(f"checkpoint {ck}: patch size {tuple(tc.patch_size)} is not Wan2.1's (1, 2, 2)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# --- random-weight initialisation --------------------------------------------------------------

def init_checkpoint(preset: str, out: str | Path, seed: int = 0) -> Path:
    """Write a random-weight checkpoint in the real layout. Same seed -> same files."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    if not p.instantiable:
        raise CheckpointError(
            f"preset {preset!r} is known to the code (it loads a real checkpoint of that shape) but is too "
            "large to instantiate with random weights on this machine"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ThfmConfig(preset=preset, **p.thfm).validate()
    logger.info("writing random-weight %s checkpoint to %s (seed %d)", preset, out, seed)

    # Each part gets its own derived seed so adding a part never changes the others' weights.
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**p.transformer)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    dim = p.transformer["num_attention_heads"] * p.transformer["attention_head_dim"]
    del transformer

    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(**p.vae)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    del vae

    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_pretrained(
        out / "scheduler"
    )

    torch.manual_seed(seed + 2)
    heads = ThfmHeads(dim, cfg)
    tensors = {HEADS_PREFIX + k: v.detach().contiguous() for k, v in heads.state_dict().items()}

    if p.text_encoder is not None:
        te, tok = _random_text_encoder(p.text_encoder, cfg, seed + 3)
        te.save_pretrained(out / "text_encoder", safe_serialization=True)
        tok.save_pretrained(out / "tokenizer")
        for task, prompt in cfg.tasks.items():
            tensors[PROMPT_PREFIX + task] = encode_prompt(te, tok, prompt, cfg.text_len).contiguous()
        te_entry, tok_entry = ["transformers", "UMT5EncoderModel"], ["transformers", "PreTrainedTokenizerFast"]
    else:
        # No text encoder in this preset: cache embeddings shaped like UMT5-XXL's (real tokens, then
        # zeros up to text_len, as WanPipeline pads them).
        gen = torch.Generator().manual_seed(seed + 3)
        for task, prompt in cfg.tasks.items():
            emb = torch.zeros(cfg.text_len, cfg.text_dim)
            n = min(cfg.text_len, len(prompt.split()) + 1)
            emb[:n] = torch.randn(n, cfg.text_dim, generator=gen) * 0.1
            tensors[PROMPT_PREFIX + task] = emb
        te_entry = tok_entry = [None, None]

    (out / THFM_DIR).mkdir(exist_ok=True)
    (out / THFM_DIR / "config.json").write_text(cfg.to_json())
    save_file(dict(sorted(tensors.items())), str(out / THFM_DIR / THFM_WEIGHTS), metadata={"format": "pt"})

    import diffusers

    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": te_entry,
        "tokenizer": tok_entry,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _random_text_encoder(te_cfg: dict, cfg: ThfmConfig, seed: int):
    """A small random UMT5 encoder and a word-level tokenizer built from the task prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    te = UMT5EncoderModel(UMT5Config(**te_cfg)).eval()
    specials = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: pad/eos as in T5
    words = sorted({w for prompt in cfg.tasks.values() for w in _words(prompt)})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    if len(vocab) > te_cfg["vocab_size"]:
        raise CheckpointError(f"tiny tokenizer needs {len(vocab)} ids but the text encoder has {te_cfg['vocab_size']}")
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=cfg.text_len,
    )
    return te, tok


def _words(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def missing_parts(path: str | Path) -> list[str]:
    """Names of required parts absent from a checkpoint directory (for quick CLI checks)."""
    ck = Path(path)
    out = [p for p in REQUIRED_PARTS if not (ck / p / "config.json").is_file()]
    for f in ("config.json", THFM_WEIGHTS):
        if not (ck / THFM_DIR / f).is_file():
            out.append(f"{THFM_DIR}/{f}")
    return out
