"""The AEIR encoder model: image encoder, text encoder and similarity head in one module."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from aeir_jax.models import encoders
from aeir_jax.models.similarity import make_similarity


class AEIRModel(nn.Module):
  """Encoders and the retrieval head. Parameters: image_encoder, text_encoder, sim_head.

  Methods (use with `model.apply(variables, ..., method=...)`):
    encode_images(regions [B,R,Dimg]) -> [B,R,E]
    encode_captions(captions [B,L] ids or [B,L,Dt] features, lengths [B], train)
      -> ([B,L,E], mask [B,L])
    score(img_frags, cap_frags, cap_mask, train) -> [Ni, Nc]
  """

  model_config: object
  vocab_size: int
  caption_dim: int = 0

  def setup(self):
    cfg = self.model_config
    dtype = jnp.dtype(cfg.compute_dtype)
    self.image_encoder = encoders.ImageEncoder(cfg.embed_dim, dtype=dtype)
    if self.caption_dim:
      self.text_encoder = encoders.FeatureTextEncoder(cfg.embed_dim, dtype=dtype)
    else:
      self.text_encoder = encoders.TextEncoder(
          self.vocab_size, cfg.word_dim, cfg.embed_dim, dropout=cfg.text_dropout,
          dtype=dtype, remat=cfg.remat_text)
    self.sim_head = make_similarity(cfg)

  def encode_images(self, regions):
    return self.image_encoder(regions)

  def encode_captions(self, captions, lengths, train: bool = False):
    mask = jnp.arange(captions.shape[1])[None, :] < lengths[:, None]
    return self.text_encoder(captions, lengths, train=train), mask

  def score(self, img_frags, cap_frags, cap_mask, train: bool = False):
    return self.sim_head(img_frags, cap_frags, cap_mask, train=train)

  def __call__(self, regions, captions, lengths, train: bool = False):
    img = self.encode_images(regions)
    cap, mask = self.encode_captions(captions, lengths, train)
    return self.score(img, cap, mask, train)
