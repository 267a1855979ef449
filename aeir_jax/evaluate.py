"""Retrieval evaluation: encode a split in batches, score all pairs, rank.

Images and captions are encoded in fixed-size jitted batches (the last one padded, so one
compilation serves every batch). The score matrix `[N_images, N_captions]` is assembled on
the host in fp32 block by block (a 5,000 x 25,000 evaluation is 500 MB of host memory, never
a device buffer of that size), then ranked by `aeir_jax.data.protocols.retrieval_metrics`
(SCAN/VSE++ protocol: i2t ranks the best of an image's 5 captions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aeir_jax.data.base import RetrievalSplit
from aeir_jax.data.protocols import retrieval_metrics
from aeir_jax.models.similarity import pooled_caption, pooled_image


def _padded_batches(n, batch):
  for start in range(0, n, batch):
    idx = np.arange(start, min(start + batch, n))
    yield idx, np.pad(idx, (0, batch - len(idx)), mode="edge")


class Evaluator:
  """Scores retrieval splits with the current params; jitted functions are built once."""

  def __init__(self, model, batch_size: int, data_sharding, replicated):
    self.model = model
    self.batch_size = batch_size
    self.data_sharding = data_sharding
    self.replicated = replicated
    # A dual-encoder head scores pooled embeddings: one matmul per block.
    self.dual = model.model_config.similarity == "cosine"

    def enc_img(variables, regions):
      frags = model.apply(variables, regions, method=model.encode_images)
      return pooled_image(frags) if self.dual else frags

    def enc_cap(variables, captions, lengths):
      frags, mask = model.apply(variables, captions, lengths, train=False,
                                method=model.encode_captions)
      return pooled_caption(frags, mask) if self.dual else (frags, mask)

    def score(variables, img, cap, mask):
      return model.apply(variables, img, cap, mask, train=False, method=model.score)

    self._enc_img = jax.jit(enc_img, out_shardings=replicated)
    self._enc_cap = jax.jit(enc_cap, out_shardings=replicated)
    self._score = jax.jit(score)
    self._dot = jax.jit(lambda a, b: jnp.dot(a, b.T, precision="highest"))

  def _put(self, x):
    return jax.device_put(x, self.replicated)

  def encode(self, variables, split: RetrievalSplit):
    """Returns host arrays: image and caption embeddings (pooled, or fragments + mask)."""
    imgs, caps = [], []
    for idx, padded in _padded_batches(split.num_images, self.batch_size):
      out = self._enc_img(variables, self._put(np.asarray(split.images[padded], np.float32)))
      imgs.append(jax.tree.map(lambda x, n=len(idx): np.asarray(x)[:n], out))
    for idx, padded in _padded_batches(split.num_captions, self.batch_size):
      out = self._enc_cap(variables, self._put(np.asarray(split.captions[padded])),
                          self._put(np.asarray(split.lengths[padded], np.int32)))
      caps.append(jax.tree.map(lambda x, n=len(idx): np.asarray(x)[:n], out))
    cat = lambda parts: jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    return cat(imgs), cat(caps)

  def scores(self, variables, split: RetrievalSplit) -> np.ndarray:
    """All-pairs scores `[N_images, N_captions]` float32 on the host."""
    img, cap = self.encode(variables, split)
    n_img, n_cap = split.num_images, split.num_captions
    out = np.empty((n_img, n_cap), np.float32)
    b = self.batch_size
    for i_idx, i_pad in _padded_batches(n_img, b):
      for c_idx, c_pad in _padded_batches(n_cap, b):
        if self.dual:
          block = self._dot(self._put(img[i_pad]), self._put(cap[c_pad]))
        else:
          block = self._score(variables, self._put(img[i_pad]), self._put(cap[0][c_pad]),
                              self._put(cap[1][c_pad]))
        out[i_idx[0]:i_idx[-1] + 1, c_idx[0]:c_idx[-1] + 1] = \
            np.asarray(block)[:len(i_idx), :len(c_idx)]
    return out

  def evaluate(self, variables, split: RetrievalSplit, prefix: str, return_scores=False):
    """Metrics `{prefix}/{metric}`; with `return_scores` also the score matrix."""
    sims = self.scores(variables, split)
    metrics = retrieval_metrics(sims, split.captions_per_image)
    metrics = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
    return (metrics, sims) if return_scores else metrics


def _subset(split: RetrievalSplit, num_images: int) -> RetrievalSplit:
  n = min(num_images, split.num_images)
  cpi = split.captions_per_image
  return RetrievalSplit(images=split.images[:n], captions=split.captions[:n * cpi],
                        lengths=split.lengths[:n * cpi], captions_per_image=cpi, name=split.name)


def pooled_embeddings(evaluator: Evaluator, variables, split: RetrievalSplit, num_images: int):
  """Pooled, l2-normalised embeddings of the first images and their captions (for plots)."""
  img, cap = evaluator.encode(variables, _subset(split, num_images))
  if evaluator.dual:
    return img, cap
  return (np.asarray(pooled_image(img)), np.asarray(pooled_caption(cap[0], cap[1])))


def retrieval_examples(sims: np.ndarray, split: RetrievalSplit, num_queries=8, top=5) -> dict:
  """Top-`top` results for the first text and image queries, with the correct ones marked."""
  cpi = split.captions_per_image
  image_ids = split.image_ids or [str(i) for i in range(split.num_images)]
  texts = split.caption_texts or [f"caption {c}" for c in range(split.num_captions)]
  t2i, i2t = [], []
  for c in range(0, min(num_queries * cpi, split.num_captions), cpi):
    order = np.argsort(-sims[:, c], kind="stable")[:top]
    t2i.append({"caption_index": c, "caption": texts[c],
                "results": [{"image_index": int(i), "image_id": image_ids[i],
                             "correct": bool(i == c // cpi)} for i in order]})
  for i in range(min(num_queries, split.num_images)):
    order = np.argsort(-sims[i], kind="stable")[:top]
    i2t.append({"image_index": i, "image_id": image_ids[i],
                "results": [{"caption_index": int(c), "caption": texts[c],
                             "correct": bool(c // cpi == i)} for c in order]})
  return {"split": split.name, "text_to_image": t2i, "image_to_text": i2t}
