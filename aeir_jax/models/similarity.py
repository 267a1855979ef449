"""Retrieval similarity heads: `(img_frags [Ni,R,E], cap_frags [Nc,L,E], cap_mask) -> [Ni,Nc]`.

Every head is a linen module with the same call signature, so configs pick one by name
(`model.similarity`). Pairwise heads (SGRAF) score every image-caption pair; the dual
encoder scores pooled embeddings and is the fast path for large evaluations.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from aeir_jax.models.encoders import l2norm


def pooled_image(img_frags):
  """`[N, R, E] -> [N, E]`: l2norm of the mean region embedding."""
  return l2norm(img_frags.mean(axis=1))


def pooled_caption(cap_frags, cap_mask):
  """`[N, L, E] -> [N, E]`: l2norm of the mean over real words."""
  maskf = cap_mask.astype(cap_frags.dtype)
  mean = (cap_frags * maskf[..., None]).sum(1) / maskf.sum(1, keepdims=True).clip(1.0)
  return l2norm(mean)


class CosineHead(nn.Module):
  """Dual encoder: cosine of pooled image and caption embeddings. No parameters."""

  @nn.compact
  def __call__(self, img_frags, cap_frags, cap_mask, train: bool = False):
    del train
    return pooled_image(img_frags) @ pooled_caption(cap_frags, cap_mask).T


SIMILARITY_NAMES = ("cosine", "saf", "sgr")


def make_similarity(model_config):
  """Builds the similarity head named by `model_config.similarity`."""
  name = model_config.similarity
  if name == "cosine":
    return CosineHead()
  if name in ("saf", "sgr"):
    from aeir_jax.models.sgraf import SGRAFHead  # pylint: disable=g-import-not-at-top
    return SGRAFHead(embed_dim=model_config.embed_dim, sim_dim=model_config.sim_dim,
                     aggregation=name, sgr_steps=model_config.sgr_steps,
                     dropout=model_config.head_dropout)
  raise ValueError(f"unknown similarity {name!r}")
