"""The served VAE sessions and the PyTorch fp32 VAE on the same inputs, for the tests of a VAE export."""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np
import torch

from thfm_serve.contract import protocol
from thfm_serve.contract.protocol import VAE_DECODER, VAE_ENCODER


def served_and_pytorch(ck, models: Mapping[str, object], grid: tuple[int, int, int], seed: int, clips: int = 2
                       ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Per procedural clip: (outputs of the served models[VAE_ENCODER] and models[VAE_DECODER], the
    PyTorch VAE's on the same encoder clip and decoder latent), each keyed by model name."""
    from thfm_serve.export import build
    from thfm_serve.export.calibration import procedural_clips

    frames, height, width = grid
    videos = procedural_clips(clips, frames, height, width, seed=seed)
    feeds_enc = build.vae_feeds(ck, VAE_ENCODER, videos, frames, height, width)
    feeds_dec = build.vae_feeds(ck, VAE_DECODER, videos, frames, height, width)
    enc, dec = ck.vae_encoder(), ck.vae_decoder()
    for fe, fd in zip(feeds_enc, feeds_dec):
        x, z = fe[protocol.ENCODER_IN], fd[protocol.DECODER_IN]
        with torch.no_grad():
            ref = {VAE_ENCODER: enc(torch.from_numpy(x)).numpy(), VAE_DECODER: dec(torch.from_numpy(z)).numpy()}
        got = {VAE_ENCODER: models[VAE_ENCODER].run({protocol.ENCODER_IN: x})[protocol.ENCODER_OUT],
               VAE_DECODER: models[VAE_DECODER].run({protocol.DECODER_IN: z})[protocol.DECODER_OUT]}
        yield got, ref
