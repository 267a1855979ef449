"""The AEIR encoder model: image encoder, text encoder and similarity head in one module."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from aeir_jax.models import encoders
from aeir_jax.models.similarity import make_similarity

TEXT_ENCODERS = ("gru", "features", "minilm")


@functools.lru_cache(maxsize=1)
def _pretrained_minilm():
  """The all-MiniLM-L6-v2 params of the installed wheel (read once per process)."""
  from aeir_jax.models.minilm import load_minilm  # pylint: disable=g-import-not-at-top
  return load_minilm()[2]["params"]


class MiniLMTextEncoder(nn.Module):
  """all-MiniLM-L6-v2 over WordPiece ids, then per-token linear + l2norm.

  `__call__(ids [B, L] int32, lengths [B], train) -> [B, L, E]`, zero at padded steps
  (`[CLS]` and `[SEP]` are fragments too). The `bert` params start as the pretrained weights;
  with `frozen` they get no gradient (Adam leaves them unchanged) and dropout is off.
  """

  embed_dim: int
  frozen: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids, lengths, train: bool = False):
    from aeir_jax.models.minilm import MiniLM  # pylint: disable=g-import-not-at-top
    mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    bert = self.param("bert", lambda _: jax.tree.map(jnp.asarray, _pretrained_minilm()))
    if self.frozen:
      bert = jax.lax.stop_gradient(bert)
    deterministic = self.frozen or not train
    rngs = {} if deterministic else {"dropout": self.make_rng("dropout")}
    tokens = MiniLM().apply({"params": bert}, ids, mask, deterministic=deterministic,
                            rngs=rngs)["tokens"]
    x = nn.Dense(self.embed_dim, dtype=self.dtype, name="fc",
                 kernel_init=encoders.xavier_uniform_torch(tokens.shape[-1], self.embed_dim),
                 bias_init=nn.initializers.zeros)(tokens)
    return encoders.l2norm(x.astype(jnp.float32)) * mask[..., None]


class AEIRModel(nn.Module):
  """Encoders and the retrieval head. Parameters: image_encoder, text_encoder, sim_head.

  Methods (use with `model.apply(variables, ..., method=...)`):
    encode_images(regions [B,R,Dimg]) -> [B,R,E]
    encode_captions(captions [B,L] ids or [B,L,Dt] features, lengths [B], train)
      -> ([B,L,E], mask [B,L])
  `model_config.text_encoder` picks the text encoder: gru (our vocabulary's ids), features
  (precomputed caption fragments, `caption_dim` > 0) or minilm (WordPiece ids).
    score(img_frags, cap_frags, cap_mask, train) -> [Ni, Nc]
  """

  model_config: object
  vocab_size: int
  caption_dim: int = 0

  def setup(self):
    cfg = self.model_config
    dtype = jnp.dtype(cfg.compute_dtype)
    self.image_encoder = encoders.ImageEncoder(cfg.embed_dim, dtype=dtype)
    if cfg.text_encoder not in TEXT_ENCODERS:
      raise ValueError(f"unknown text encoder {cfg.text_encoder!r}")
    if (cfg.text_encoder == "features") != bool(self.caption_dim):
      raise ValueError(f"text encoder {cfg.text_encoder!r} does not read captions with "
                       f"caption_dim={self.caption_dim}")
    if cfg.text_encoder == "features":
      self.text_encoder = encoders.FeatureTextEncoder(cfg.embed_dim, dtype=dtype)
    elif cfg.text_encoder == "minilm":
      self.text_encoder = MiniLMTextEncoder(cfg.embed_dim, frozen=cfg.text_frozen, dtype=dtype)
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
