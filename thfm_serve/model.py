"""The THFM model, composed from diffusers' Wan modules without forking them.

THFM repurposes Wan2.1 text-to-video into one forward pass:
  1. the clean video latent goes in, the timestep is 0, the transformer runs once, and the predicted
     latent is the negated transformer output (Wan predicts flow velocity v = eps - x0, so -v is the
     clean target in latent space);
  2. one learnable token per input frame is appended to the video tokens; the tokens use Wan's 3D
     rotary embedding with learned spatial coordinates and the frame index mapped onto the latent
     time axis; they leave the sequence before the output norm and MLP heads map them to keypoints.

``ThfmCore`` reuses the submodules of ``diffusers.WanTransformer3DModel`` (patch embedding, rotary
tables, condition embedder, blocks, output norm/projection) and only re-orders the sequence handling
around them, so a real Wan2.1 checkpoint loads unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from .config import VAE_TEMPORAL, ThfmConfig

# Wan's rotary base; diffusers' WanRotaryPosEmbed uses its default theta=10000 and does not store it.
ROPE_THETA = 10000.0


class KeypointHead(nn.Module):
    """MLP from one output token to K joints x `coords` values."""

    def __init__(self, dim: int, hidden: int, num_joints: int, coords: int):
        super().__init__()
        self.num_joints = num_joints
        self.coords = coords
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_joints * coords)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, T, D] -> [B, T, K, coords]
        out = self.fc2(self.act(self.fc1(self.norm(tokens))))
        return out.unflatten(-1, (self.num_joints, self.coords))


class ThfmHeads(nn.Module):
    """Everything THFM adds to Wan: the learnable token, its learned position, the keypoint heads.

    Saved to ``thfm/thfm.safetensors``; the token count is not a parameter (one per input frame),
    so one checkpoint serves any clip length.
    """

    def __init__(self, dim: int, cfg: ThfmConfig):
        super().__init__()
        self.token = nn.Parameter(torch.randn(dim) * 0.02)
        # Learned spatial rotary coordinates, as fractions of the latent patch grid (0 = top/left,
        # 1 = bottom/right), so the same weights fit any resolution.
        self.token_position = nn.Parameter(torch.full((2,), 0.5))
        self.head2d = KeypointHead(dim, cfg.head_hidden, cfg.num_joints, 2)
        self.head3d = KeypointHead(dim, cfg.head_hidden, cfg.num_joints, 3)


def rotary_at(rope: nn.Module, t_pos: torch.Tensor, h_pos: torch.Tensor, w_pos: torch.Tensor):
    """Wan 3D rotary cos/sin tables at arbitrary (fractional) positions.

    Matches ``diffusers.embeddings.get_1d_rotary_pos_embed(use_real=True, repeat_interleave_real=True)``
    on integer positions (tested), computed in float32 (TensorRT has no float64).
    t_pos, h_pos, w_pos: [N] -> cos, sin: [1, N, 1, head_dim]
    """
    cos_parts, sin_parts = [], []
    for pos, dim in ((t_pos, rope.t_dim), (h_pos, rope.h_dim), (w_pos, rope.w_dim)):
        exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device)[: dim // 2] / dim
        inv_freq = (1.0 / (ROPE_THETA**exponents)).to(torch.float32)
        angles = pos.to(torch.float32)[:, None] * inv_freq[None, :]  # [N, dim/2]
        cos_parts.append(angles.cos().repeat_interleave(2, dim=-1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=-1))
    cos = torch.cat(cos_parts, dim=-1)[None, :, None, :]
    sin = torch.cat(sin_parts, dim=-1)[None, :, None, :]
    return cos, sin


def apply_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding on x [B, L, heads, head_dim] (pairs (2i, 2i+1) rotate).

    The same arithmetic as diffusers' WanAttnProcessor, which writes the two halves into an empty
    tensor with strided slice assignment. Traced to ONNX, that assignment becomes ScatterND wrapped
    in full-tensor Transposes (3 per half, 12 per self-attention): on a 1.3B core at 17x256x256 they
    took 20% of onnxruntime's int8 forward. Interleaving with stack + flatten is a reshape instead.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class ThfmAttnProcessor:
    """diffusers' WanAttnProcessor for the text-to-video blocks THFM uses, with `apply_rotary`.

    Set on ThfmCore's attention modules (attn1: self-attention with rotary, attn2: cross-attention
    to the text). The image-conditioned (I2V) branch and fused projections are not part of THFM and
    are refused rather than silently ignored.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if attn.add_k_proj is not None or attn.fused_projections:
            raise NotImplementedError("ThfmAttnProcessor: image-conditioned or fused-projection Wan attention")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_rotary(query, *rotary_emb)
            key = apply_rotary(key, *rotary_emb)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class ThfmCore(nn.Module):
    """Transformer + learnable tokens: the attention-heavy part exported as one ONNX/TensorRT model.

    forward(latent [B,16,T',H',W'], text [B,L,text_dim]) ->
        predicted latent [B,16,T',H',W'], keypoints2d [B,T,K,2] (normalised [0,1] image coords),
        keypoints3d [B,T,K,3] (metres, relative to the root joint), with T = 4(T'-1)+1 frames.
    """

    def __init__(self, transformer: WanTransformer3DModel, heads: ThfmHeads, root_joint: int = 0):
        super().__init__()
        self.transformer = transformer
        self.heads = heads
        self.root_joint = root_joint
        # The processor is set on the (shared) transformer: every THFM path, eager, compiled and
        # exported, runs the same attention code (tests compare it with diffusers' own processor).
        for block in transformer.blocks:
            block.attn1.set_processor(ThfmAttnProcessor())
            block.attn2.set_processor(ThfmAttnProcessor())

    def forward(self, latent: torch.Tensor, text: torch.Tensor):
        latent_pred, tokens = self.run_transformer(latent, text, with_tokens=True)
        kp2d = torch.sigmoid(self.heads.head2d(tokens))
        kp3d = self.heads.head3d(tokens)
        kp3d = kp3d - kp3d[:, :, self.root_joint : self.root_joint + 1]
        return latent_pred, kp2d.float(), kp3d.float()

    def run_transformer(self, latent: torch.Tensor, text: torch.Tensor, with_tokens: bool = True):
        """The Wan forward at timestep 0 with the THFM tokens spliced in.

        Returns (predicted latent = -v, token outputs [B, T, D] or None).
        """
        tr = self.transformer
        batch, _, lat_frames, lat_h, lat_w = latent.shape
        p_t, p_h, p_w = tr.config.patch_size
        grid_f, grid_h, grid_w = lat_frames // p_t, lat_h // p_h, lat_w // p_w

        # 1. Video tokens and their rotary tables (built in float64 by diffusers; float32 here).
        freqs_cos, freqs_sin = tr.rope(latent)  # [1, S, 1, head_dim]
        freqs_cos, freqs_sin = freqs_cos.float(), freqs_sin.float()
        hidden = tr.patch_embedding(latent).flatten(2).transpose(1, 2).contiguous()  # [B, S, D]
        num_video = hidden.shape[1]

        # 2. One learnable token per input frame. T = 4(T'-1)+1 input frames map onto the latent
        #    time axis as i * (T'-1)/(T-1) = i/4 (the VAE's 4x temporal compression).
        if with_tokens:
            num_frames = VAE_TEMPORAL * (lat_frames - 1) + 1
            frame_idx = torch.arange(num_frames, device=latent.device, dtype=torch.float32)
            t_pos = frame_idx / VAE_TEMPORAL
            pos = self.heads.token_position.float()
            h_pos = (pos[0] * (grid_h - 1)).expand(num_frames)
            w_pos = (pos[1] * (grid_w - 1)).expand(num_frames)
            tok_cos, tok_sin = rotary_at(tr.rope, t_pos, h_pos, w_pos)
            tokens = self.heads.token.to(hidden.dtype).expand(batch, num_frames, -1)
            hidden = torch.cat([hidden, tokens], dim=1)
            freqs_cos = torch.cat([freqs_cos, tok_cos], dim=1)
            freqs_sin = torch.cat([freqs_sin, tok_sin], dim=1)

        # 3. Conditions at timestep 0: diffusers' Wan takes timestep = 1000 * sigma; clean input = 0.
        timestep = torch.zeros(batch, device=latent.device, dtype=torch.float32)
        temb, timestep_proj, context, _ = tr.condition_embedder(timestep, text, None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # [B, 6, D]

        # 4. Blocks: full bidirectional attention over video tokens + frame tokens.
        for block in tr.blocks:
            hidden = block(hidden, context, timestep_proj, (freqs_cos, freqs_sin))

        # 5. Frame tokens leave before the output norm and unpatchify.
        token_out = hidden[:, num_video:] if with_tokens else None
        hidden = hidden[:, :num_video]

        shift, scale = (tr.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (tr.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = tr.proj_out(hidden)
        hidden = hidden.reshape(batch, grid_f, grid_h, grid_w, p_t, p_h, p_w, -1)
        velocity = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return -velocity, token_out


class VaeEncoder(nn.Module):
    """video [B,3,T,H,W] in [-1,1] -> normalised latent [B,16,T',H/8,W/8] (distribution mode)."""

    def __init__(self, vae: AutoencoderKLWan):
        super().__init__()
        self.vae = vae
        z = vae.config.z_dim
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1), persistent=False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        mu = self.vae.encode(video).latent_dist.mode()
        # Wan's latent normalisation, as WanPipeline applies it: (z - mean) / std.
        return (mu - self.mean.to(mu.dtype)) * self.inv_std.to(mu.dtype)


class VaeDecoder(nn.Module):
    """normalised latent [B,16,T',h,w] -> task map [B,3,T,8h,8w] in [0,1]."""

    def __init__(self, vae: AutoencoderKLWan):
        super().__init__()
        self.vae = vae
        z = vae.config.z_dim
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1), persistent=False)

    def denormalise(self, latent: torch.Tensor) -> torch.Tensor:
        """The core's normalised latent -> the VAE's own latent space (Wan's latents_mean/std)."""
        return latent * self.std.to(latent.dtype) + self.mean.to(latent.dtype)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        video = self.vae.decode(self.denormalise(latent)).sample  # [-1, 1] (the Wan decoder clamps)
        # Every dense target was a 3-channel image in [0, 1].
        return ((video.float() + 1.0) * 0.5).clamp(0.0, 1.0)
