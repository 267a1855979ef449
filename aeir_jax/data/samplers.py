"""Batch index samplers: paired source batches and unpaired target batches.

Every sampler is a pure function of (seed, step): the batch at step s is computed from a
per-epoch permutation seeded by (seed, epoch), so resuming at step s reproduces the data
order exactly without saving iterator state. Each process of a multi-host run takes only its
contiguous slice of the global batch (`process_index`, `process_count`).
"""

from __future__ import annotations

import functools

import numpy as np

from aeir_jax.data.base import RetrievalSplit


class _EpochPermutation:
  """A seeded permutation of range(n) per epoch (cached for the current epoch)."""

  def __init__(self, n: int, seed: int, stream: int):
    self.n, self.seed, self.stream = n, seed, stream

  @functools.lru_cache(maxsize=2)
  def __call__(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)


def _local_slice(global_batch: int, process_index: int, process_count: int) -> slice:
  per = global_batch // process_count
  return slice(process_index * per, (process_index + 1) * per)


class PairedSampler:
  """Source batches: captions drawn without replacement each epoch, with their own images.

  `indices(step) -> (image_idx [b], caption_idx [b])` for this process's slice b of the global
  batch; image i of the batch is the image caption i describes.
  """

  def __init__(self, split: RetrievalSplit, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self.split = split
    self.global_batch = global_batch
    self.steps_per_epoch = split.num_captions // global_batch
    self._perm = _EpochPermutation(split.num_captions, seed, 0)
    self._slice = _local_slice(global_batch, process_index, process_count)

  def position(self, step: int) -> dict:
    return {"epoch": step // self.steps_per_epoch, "batch_in_epoch": step % self.steps_per_epoch}

  def indices(self, step: int):
    epoch, pos = divmod(step, self.steps_per_epoch)
    chunk = self._perm(epoch)[pos * self.global_batch:(pos + 1) * self.global_batch]
    captions = chunk[self._slice]
    return self.split.caption_image(captions), captions


class UnpairedSampler:
  """Target batches: images and captions drawn independently; the pairing is never used.

  An epoch is one pass over the captions; images are drawn from a separate permutation of the
  images, each repeated captions_per_image times (the reference's distribution), so the batch's
  images and captions are unrelated by construction.
  """

  def __init__(self, split: RetrievalSplit, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self.split = split
    self.global_batch = global_batch
    self.steps_per_epoch = split.num_captions // global_batch
    reps = split.captions_per_image
    self._image_perm = _EpochPermutation(split.num_images * reps, seed, 1)
    self._caption_perm = _EpochPermutation(split.num_captions, seed, 2)
    self._reps = reps
    self._slice = _local_slice(global_batch, process_index, process_count)

  def position(self, step: int) -> dict:
    return {"epoch": step // self.steps_per_epoch, "batch_in_epoch": step % self.steps_per_epoch}

  def indices(self, step: int):
    epoch, pos = divmod(step, self.steps_per_epoch)
    window = slice(pos * self.global_batch, (pos + 1) * self.global_batch)
    images = self._image_perm(epoch)[window][self._slice] // self._reps
    captions = self._caption_perm(epoch)[window][self._slice]
    return images, captions


def gather(split: RetrievalSplit, image_idx, caption_idx) -> dict:
  """Reads the rows of a batch: {'images' [b,R,D] f32, 'captions' [b,L..], 'lengths' [b]}.

  Rows are read in sorted order (sequential on a memmap) and put back in batch order.
  """
  order = np.argsort(image_idx, kind="stable")
  images = np.empty((len(image_idx),) + split.images.shape[1:], np.float32)
  images[order] = split.images[np.asarray(image_idx)[order]]
  return {"images": images,
          "captions": np.asarray(split.captions[np.asarray(caption_idx)]),
          "lengths": np.asarray(split.lengths[np.asarray(caption_idx)], np.int32)}
