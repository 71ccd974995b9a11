"""The THFM core against diffusers' own Wan modules (the independent reference)."""

from __future__ import annotations

import torch

from thfm_serve.checkpoint import load_checkpoint
from thfm_serve.config import VAE_TEMPORAL
from thfm_serve.model import ThfmAttnProcessor, rotary_at


def _inputs(ck, batch=1, lat_frames=3, lat_hw=(8, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 16, lat_frames, *lat_hw, generator=g)
    text = torch.stack([ck.task_embedding(t) for t in ck.tasks[:batch]])
    return latent, text


@torch.no_grad()
def test_core_without_tokens_equals_diffusers_forward(tiny_checkpoint):
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    ck = load_checkpoint(tiny_checkpoint)
    core = ck.core()
    # The reference is a separate diffusers model with diffusers' own attention processor (the core
    # sets THFM's processor on its transformer).
    peer = WanTransformer3DModel.from_pretrained(tiny_checkpoint, subfolder="transformer").eval()
    assert all(isinstance(b.attn1.processor, WanAttnProcessor) for b in peer.blocks)
    assert all(isinstance(b.attn1.processor, ThfmAttnProcessor) for b in ck.transformer.blocks)
    for batch, lat_frames, hw in [(1, 3, (8, 8)), (2, 1, (4, 6)), (3, 2, (6, 10))]:
        latent, text = _inputs(ck, batch, lat_frames, hw, seed=batch)
        pred, tokens = core.run_transformer(latent, text, with_tokens=False)
        # diffusers: WanTransformer3DModel at timestep 0 predicts velocity; THFM's latent is -v.
        ref = peer(latent, torch.zeros(batch), text, return_dict=False)[0]
        assert tokens is None
        assert pred.shape == ref.shape
        assert (pred + ref).abs().max().item() <= 1e-5


@torch.no_grad()
def test_core_forward_shapes_and_keypoint_conventions(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    latent, text = _inputs(ck, batch=2, lat_frames=3, lat_hw=(8, 6))
    pred, kp2d, kp3d = ck.core()(latent, text)
    frames = VAE_TEMPORAL * (3 - 1) + 1
    k = ck.config.num_joints
    assert pred.shape == latent.shape
    assert kp2d.shape == (2, frames, k, 2) and kp3d.shape == (2, frames, k, 3)
    assert kp2d.min() >= 0 and kp2d.max() <= 1
    assert kp3d[:, :, ck.config.root_joint].abs().max() == 0  # root-relative
    # The appended tokens take part in attention: video outputs differ from the token-free forward.
    pred_no_tokens, _ = ck.core().run_transformer(latent, text, with_tokens=False)
    assert not torch.allclose(pred, pred_no_tokens)
    # Different task prompts give different outputs; rows of a batch are independent.
    assert not torch.allclose(pred[0], pred[1])
    single = ck.core()(latent[1:], text[1:])
    assert torch.allclose(single[0], pred[1:], atol=1e-5)
    assert torch.allclose(single[1], kp2d[1:], atol=1e-5)


def test_token_rotary_matches_diffusers_tables_at_integer_positions(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    rope = ck.transformer.rope
    pos = torch.arange(0, 12, dtype=torch.float32)
    cos, sin = rotary_at(rope, pos, pos.flip(0), pos * 0 + 3)
    d_t, d_h = rope.t_dim, rope.h_dim
    table_cos = rope.freqs_cos.float()  # [max_seq_len, head_dim], diffusers' own tables
    table_sin = rope.freqs_sin.float()
    idx = pos.long()
    exp_cos = torch.cat(
        [table_cos[idx, :d_t], table_cos[idx.flip(0), d_t : d_t + d_h], table_cos[idx * 0 + 3, d_t + d_h :]], dim=-1
    )
    exp_sin = torch.cat(
        [table_sin[idx, :d_t], table_sin[idx.flip(0), d_t : d_t + d_h], table_sin[idx * 0 + 3, d_t + d_h :]], dim=-1
    )
    assert torch.allclose(cos[0, :, 0], exp_cos, atol=1e-6)
    assert torch.allclose(sin[0, :, 0], exp_sin, atol=1e-6)


@torch.no_grad()
def test_token_temporal_positions_follow_frames(tiny_checkpoint):
    """Token i sits at latent time i/4: the tokens of frames 0 and 4 share the rotary time of
    latent frames 0 and 1 (checked through the video-token tables diffusers builds)."""
    ck = load_checkpoint(tiny_checkpoint)
    rope = ck.transformer.rope
    latent = torch.zeros(1, 16, 3, 4, 4)
    video_cos, _ = rope(latent)  # [1, 3*2*2, 1, D], frame-major
    per_frame = 2 * 2
    t = torch.tensor([0.0, 4.0, 8.0]) / VAE_TEMPORAL
    cos, _ = rotary_at(rope, t, torch.zeros(3), torch.zeros(3))
    for i in range(3):
        assert torch.allclose(cos[0, i, 0, : rope.t_dim], video_cos[0, i * per_frame, 0, : rope.t_dim].float(), atol=1e-6)


@torch.no_grad()
def test_vae_wrappers_apply_wan_latent_normalisation(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    latent = ck.vae_encoder()(video)
    raw = ck.vae.encode(video).latent_dist.mode()
    mean = torch.tensor(ck.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ck.vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert latent.shape == (1, 16, 2, 4, 6)
    assert torch.allclose(latent, (raw - mean) / std, atol=1e-5)
    maps = ck.vae_decoder()(latent)
    ref = ck.vae.decode(raw).sample
    assert maps.shape == (1, 3, 5, 32, 48)
    assert torch.allclose(maps, ((ref + 1) / 2).clamp(0, 1), atol=1e-5)


@torch.no_grad()
def test_attention_processor_matches_diffusers_processor(tiny_checkpoint):
    """Self-attention with rotary tables and cross-attention to text, in fp32 and bf16."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    ck = load_checkpoint(tiny_checkpoint)
    block = ck.transformer.blocks[0]
    latent, text = _inputs(ck, batch=2, lat_frames=2, lat_hw=(4, 6), seed=3)
    cos, sin = ck.transformer.rope(latent)
    seq = cos.shape[1]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, seq, ck.transformer.config.num_attention_heads * ck.transformer.config.attention_head_dim, generator=g)
    context = ck.transformer.condition_embedder(torch.zeros(2), text, None)[2]
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 0.0)):
        b = block.to(dtype)
        for attn, args in ((b.attn1, (x.to(dtype), None, None, (cos.float(), sin.float()))),
                           (b.attn2, (x.to(dtype), context.to(dtype), None, None))):
            ours = ThfmAttnProcessor()(attn, *args)
            ref = WanAttnProcessor()(attn, *args)
            assert ours.dtype == ref.dtype == dtype
            assert (ours.float() - ref.float()).abs().max().item() <= tol, (attn, dtype)
    block.float()
