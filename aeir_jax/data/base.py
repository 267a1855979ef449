"""Containers every data source fills; the trainer and the evaluator only see these.

Conventions (those of SCAN precomp data, so every source looks alike):
  * images are region-fragment features `[N, R, D]` float (a numpy array or a read-only
    `np.memmap`; rows are read on demand, never the whole array);
  * captions are token ids `[5N, L]` int32, padded with 0, with true lengths `[5N]` (the
    lengths count every real token, `<start>` and `<end>` included); caption c describes
    image c // captions_per_image;
  * or, for precomputed sentence features, caption fragments `[5N, L, Dt]` float with lengths.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass
class RetrievalSplit:
  """One split of one domain: images and their captions.

  Attributes:
    images: `[N, R, D]` float region features (array or memmap).
    captions: `[N * cpi, L]` int32 token ids (0 = padding) or `[N * cpi, L, Dt]` float
      caption fragment features.
    lengths: `[N * cpi]` int32 true caption lengths, 1 <= length <= L.
    captions_per_image: captions per image (5 for every dataset of this field).
    name: a label used in metric keys and messages, e.g. "target_test".
    image_ids: optional `[N]` identifiers (file names) for reports.
    caption_texts: optional list of caption strings for reports.
  """

  images: np.ndarray
  captions: np.ndarray
  lengths: np.ndarray
  captions_per_image: int = 5
  name: str = ""
  image_ids: Optional[list] = None
  caption_texts: Optional[list] = None

  @property
  def num_images(self) -> int:
    return int(self.images.shape[0])

  @property
  def num_captions(self) -> int:
    return int(self.captions.shape[0])

  def caption_image(self, caption_index):
    """Index of the image a caption describes (only meaningful for paired splits)."""
    return np.asarray(caption_index) // self.captions_per_image


@dataclasses.dataclass
class DomainData:
  """The splits of one domain. `train` of the target domain is used unpaired."""

  train: RetrievalSplit
  test: RetrievalSplit
  dev: Optional[RetrievalSplit] = None


@dataclasses.dataclass
class TransferData:
  """Everything a run reads: a paired source domain and an unpaired target domain.

  Attributes:
    source: the source domain; its train split is used with its pairing.
    target: the target domain; its train images and captions are sampled independently, so
      the trainer never sees which caption belongs to which image.
    vocab_size: number of token ids (0 when captions are precomputed features).
    image_dim: D of the image region features.
    caption_dim: Dt of precomputed caption fragments, or 0 for token ids.
    words: optional id -> word list, for reports.
  """

  source: DomainData
  target: DomainData
  vocab_size: int
  image_dim: int
  caption_dim: int = 0
  words: Optional[list] = None
