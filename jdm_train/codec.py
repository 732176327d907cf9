"""The frozen ends of SD1.x shared by training and evaluation: captions -> CLIP hidden states,
images <-> latents in diffusion scale (the VAE's latents times its `scaling_factor`).

Images are BCHW in [0, 1] everywhere in this project; the VAE works in [-1, 1], and this is
the one place that converts."""

from __future__ import annotations

import torch
from torch import Tensor

from jdm_train.model_io import tokenize


class Codec:
    """Text encoder + VAE (+ an optional faster decoder, TAESD, for the condition term).

    `encode_text` caches hidden states per (encoder, caption): captions repeat across steps and
    the text encoder is frozen."""

    def __init__(self, tokenizer, text_encoder, vae, decoder=None, cache_size: int = 4096):
        self.tokenizer, self.text_encoder, self.vae = tokenizer, text_encoder, vae
        self.decoder = decoder if decoder is not None else vae
        self.latent_scale = float(vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)
        self._cache: dict[tuple[int, str], Tensor] = {}
        self._cache_size = cache_size

    @classmethod
    def from_pipe(cls, pipe, decoder=None) -> "Codec":
        """From a `model_io.SD1Pipeline` (anything with tokenizer, text_encoder and vae)."""
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.vae, decoder)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode_text(self, captions: list[str], encoder=None) -> Tensor:
        """(B, 77, D) hidden states of `encoder` (the codec's text encoder by default)."""
        encoder = encoder or self.text_encoder
        missing = [c for c in dict.fromkeys(captions) if (id(encoder), c) not in self._cache]
        if missing:
            device = next(encoder.parameters()).device
            hidden = encoder(tokenize(self.tokenizer, missing).to(device))[0]
            if len(self._cache) + len(missing) > self._cache_size:
                self._cache.clear()
            for c, h in zip(missing, hidden):
                self._cache[(id(encoder), c)] = h
        return torch.stack([self._cache[(id(encoder), c)] for c in captions])

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Data latents (B, 4, h, w) in diffusion scale: the mean of the VAE posterior (deterministic)."""
        latents = self.vae.encode((images * 2 - 1).to(self.device, self.dtype)).latent_dist.mode()
        return latents.float() * self.latent_scale

    def decode(self, latents: Tensor) -> Tensor:
        """Differentiable latents -> images BCHW in [0, 1], through the VAE or the faster decoder."""
        if self.decoder is self.vae:
            images = self.vae.decode((latents / self.latent_scale).to(self.dtype)).sample
        else:  # TAESD decodes diffusion-scale latents directly
            images = self.decoder.decode(latents.to(next(self.decoder.parameters()).dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def latent_shape(self, batch: int, resolution: int) -> tuple[int, int, int, int]:
        size = resolution // self.vae_scale_factor
        return (batch, self.latent_channels, size, size)
