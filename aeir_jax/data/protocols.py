"""Image-sentence retrieval metrics and the evaluation protocols of SCAN/SGRAF/AECR.

Input: a score matrix `sims [N, cpi * N]` (rows images, columns captions, caption c describes
image c // cpi; cpi = 5 in every dataset of this field). Higher scores rank first.

Ranks are 0-based:
  * image -> text (i2t): for image n, the rank of the best-ranked of its captions;
  * text -> image (t2i): for caption c, the rank of image c // cpi.
Ties are counted optimistically: the rank of an item is the number of items with a STRICTLY
greater score. (SCAN ranks by `argsort`, whose order among ties is unspecified; with real-valued
similarities ties are rare, and this rule makes the result well-defined.)

Metrics: R@K = 100 * fraction of ranks < K for K = 1, 5, 10; medr = floor(median rank) + 1;
meanr = mean rank + 1; rsum = the six recalls added up.

Protocols and their metric-key prefixes:
  * `full` over the whole matrix: Flickr30K 1K test (`f30k_1k/...`), COCO 5K (`coco_5k/...`);
  * `fold5` (COCO 1K): 5 folds of N/5 consecutive images with their captions, each metric
    averaged over the folds; rsum is the sum of the six mean recalls (not SCAN's printed
    "rsum", which is 6 x the mean i2t recall).
"""

from __future__ import annotations

import numpy as np

PROTOCOLS = ("full", "fold5")
# Standard evaluations: key prefix -> protocol.
STANDARD = {"f30k_1k": "full", "coco_5k": "full", "coco_5fold1k": "fold5"}
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
           "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum")
_CHUNK_ROWS = 256


def retrieval_ranks(sims, captions_per_image: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """0-based ranks of the ground truth in both directions (ties count optimistically).

  Reads `sims` in chunks of 256 rows, so a memory-mapped or device-resident matrix is never
  copied whole (the largest temporaries are `[256, cpi * N]`).

  Args:
    sims: `[N, cpi * N]` scores, a numpy/JAX array or memmap.
    captions_per_image: cpi.

  Returns:
    i2t_ranks `[N]` int64 (best caption of each image) and t2i_ranks `[cpi * N]` int64.
  """
  if (len(sims.shape) != 2 or not sims.shape[0]
      or sims.shape[1] != captions_per_image * sims.shape[0]):
    raise ValueError(f"sims must be [N > 0 images, {captions_per_image} * N captions], got "
                     f"{tuple(sims.shape)}")
  n_images, n_captions = sims.shape
  captions = np.arange(n_captions)
  positives = np.asarray(sims[captions // captions_per_image, captions])
  i2t_ranks = np.empty((n_images,), np.int64)
  t2i_ranks = np.zeros((n_captions,), np.int64)
  for start in range(0, n_images, _CHUNK_ROWS):
    block = np.asarray(sims[start:start + _CHUNK_ROWS])
    if not np.isfinite(block).all():
      raise ValueError(f"sims rows {start}..{start + len(block) - 1} hold NaN or inf; ranks "
                       "would be meaningless")
    own = positives[start * captions_per_image:(start + len(block)) * captions_per_image]
    best = own.reshape(len(block), captions_per_image).max(axis=1)
    i2t_ranks[start:start + len(block)] = (block > best[:, None]).sum(axis=1)
    t2i_ranks += (block > positives[None, :]).sum(axis=0)
  return i2t_ranks, t2i_ranks


def recall_metrics(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> dict:
  """R@1/5/10 (percent), medr, meanr per direction and rsum, from 0-based ranks."""
  metrics = {}
  for direction, ranks in (("i2t", np.asarray(i2t_ranks)), ("t2i", np.asarray(t2i_ranks))):
    for k in (1, 5, 10):
      metrics[f"{direction}_r{k}"] = 100.0 * float(np.mean(ranks < k))
    metrics[f"{direction}_medr"] = float(np.floor(np.median(ranks)) + 1)
    metrics[f"{direction}_meanr"] = float(np.mean(ranks) + 1)
  metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
  return metrics


def retrieval_metrics(sims, captions_per_image: int = 5) -> dict:
  """All metrics of `METRICS` over the whole matrix `sims [N, cpi * N]` (unprefixed keys)."""
  return recall_metrics(*retrieval_ranks(sims, captions_per_image))


def fold_metrics(sims, n_folds: int = 5, captions_per_image: int = 5) -> dict:
  """Metrics averaged over `n_folds` folds of N / n_folds consecutive images (COCO 1K).

  rsum is recomputed as the sum of the six mean recalls (equal to the mean fold rsum).
  """
  n_images = sims.shape[0]
  if n_images % n_folds:
    raise ValueError(f"{n_images} images cannot be cut into {n_folds} equal folds")
  size = n_images // n_folds
  per_fold = [
      retrieval_metrics(sims[f * size:(f + 1) * size,
                             f * size * captions_per_image:(f + 1) * size * captions_per_image],
                        captions_per_image)
      for f in range(n_folds)]
  metrics = {key: float(np.mean([fold[key] for fold in per_fold])) for key in METRICS}
  metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
  return metrics


def protocol_metrics(sims, protocol: str, prefix: str, captions_per_image: int = 5) -> dict:
  """Metrics of one protocol with keys `<prefix>/<metric>`, e.g. `coco_5fold1k/i2t_r1`.

  Args:
    sims: `[N, cpi * N]` scores.
    protocol: "full" or "fold5".
    prefix: the evaluation's name, e.g. one of `STANDARD` ("f30k_1k", "coco_5k",
      "coco_5fold1k") or a split name such as "target_test".
    captions_per_image: cpi.
  """
  if protocol == "full":
    metrics = retrieval_metrics(sims, captions_per_image)
  elif protocol == "fold5":
    metrics = fold_metrics(sims, 5, captions_per_image)
  else:
    raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
  return {f"{prefix}/{key}": value for key, value in metrics.items()}
