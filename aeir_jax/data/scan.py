"""SCAN precomputed-feature datasets (`f30k_precomp`, `coco_precomp`), read lazily.

Layout of `<root>/<data_name>/` (SCAN's `data.zip`; see docs/data.md):
  `<split>_ims.npy`   `[N, 36, 2048]` float32 bottom-up-attention region features;
  `<split>_caps.txt`  5N lines, one caption per line, in image order: caption c describes
                      image c // 5;
for split in train, dev, test, testall (COCO only: its 5,000 test images).

Rules kept from SCAN's loader:
  * the features are memory-mapped (`np.load(mmap_mode='r')`) and only the rows a batch asks
    for are read: COCO train is about 33 GB;
  * if the file has one feature row per caption (5N rows, each image repeated), every 5th row
    is used, which is what SCAN's `im_div` does;
  * `dev` is cut to its first 1,000 images and 5,000 captions.
Checks: array shape and dtype, 5 captions per image, every caption line non-empty and valid
UTF-8, and finite features on a bounded sample of rows (`FINITE_CHECK_ROWS` rows spread over
the file; `check_all_finite=True` reads every row, in chunks).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import numpy as np

from aeir_jax.data.base import DomainData, RetrievalSplit
from aeir_jax.data.vocab import Vocab
from aeir_jax.errors import DataError

SPLITS = ("train", "dev", "test", "testall")
CAPTIONS_PER_IMAGE = 5
DEV_IMAGES = 1000
FINITE_CHECK_ROWS = 64
_CHUNK_ROWS = 256


def split_paths(root: str, data_name: str, split: str) -> tuple[str, str]:
  """Paths of `<split>_ims.npy` and `<split>_caps.txt` under `<root>/<data_name>`."""
  folder = os.path.join(root, data_name)
  return (os.path.join(folder, f"{split}_ims.npy"), os.path.join(folder, f"{split}_caps.txt"))


def read_caption_lines(path: str) -> list[str]:
  """Caption lines of a text file, stripped; each must be non-empty UTF-8."""
  try:
    with open(path, "rb") as f:
      content = f.read()
  except FileNotFoundError:
    raise DataError(f"caption file {path} does not exist; put the SCAN precomp files there "
                    "(see docs/data.md)") from None
  lines = content.split(b"\n")
  if lines and not lines[-1].strip():
    lines.pop()
  captions = []
  for number, raw in enumerate(lines, start=1):
    try:
      caption = raw.strip().decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{path}:{number}: caption is not valid UTF-8 ({e.reason} at byte "
                      f"{e.start}); re-encode the file as UTF-8") from None
    if not caption:
      raise DataError(f"{path}:{number}: empty caption line; remove it or fill in the caption "
                      "(captions must stay in image order, 5 per image)")
    captions.append(caption)
  return captions


def open_features(path: str) -> np.ndarray:
  """Memory-maps a `[N, R, D]` float feature array read-only; nothing is read yet."""
  try:
    features = np.load(path, mmap_mode="r", allow_pickle=False)
  except FileNotFoundError:
    raise DataError(f"feature file {path} does not exist; put the SCAN precomp files there "
                    "(see docs/data.md)") from None
  except ValueError as e:
    raise DataError(f"feature file {path} is not a readable .npy array ({e}); download or "
                    "convert it again") from None
  if features.ndim != 3 or not np.issubdtype(features.dtype, np.floating):
    raise DataError(f"feature file {path} holds {features.dtype} {features.shape}, expected "
                    "float [images, regions, dim] (SCAN: float32 [N, 36, 2048]); check the file")
  if min(features.shape) == 0:
    raise DataError(f"feature file {path} is empty (shape {features.shape}); download or "
                    "convert it again")
  return features


def check_finite(features: np.ndarray, path: str, all_rows: bool = False) -> None:
  """Raises DataError if sampled rows (or all rows) of `features [N, R, D]` hold NaN/inf.

  The sample is `FINITE_CHECK_ROWS` rows evenly spread from the first to the last, so a
  check costs the same on a 33 GB file as on a small one.
  """
  n = features.shape[0]
  if all_rows:
    starts = range(0, n, _CHUNK_ROWS)
    chunks = ((s, np.asarray(features[s:s + _CHUNK_ROWS])) for s in starts)
  else:
    rows = np.unique(np.linspace(0, n - 1, min(n, FINITE_CHECK_ROWS)).astype(np.int64))
    chunks = ((0, np.asarray(features[rows])),)
  for start, chunk in chunks:
    bad = ~np.isfinite(chunk).reshape(chunk.shape[0], -1).all(axis=1)
    if bad.any():
      row = start + int(np.argmax(bad)) if all_rows else int(rows[np.argmax(bad)])
      raise DataError(f"feature file {path}: row {row} holds NaN or inf values; regenerate "
                      "the features")


def load_scan_split(root: str, data_name: str, split: str, vocab: Vocab, max_len: int,
                    name: str = "", truncate_dev: bool = True,
                    check_all_finite: bool = False) -> RetrievalSplit:
  """Reads one split of a SCAN precomp dataset.

  Args:
    root: folder holding `<data_name>/`.
    data_name: e.g. "f30k_precomp" or "coco_precomp".
    split: one of `SPLITS`.
    vocab: the vocabulary (and tokenisation) that turns captions into ids.
    max_len: caption width L (see `Vocab.encode_batch` for truncation).
    name: label of the split in metric keys and messages (default `<data_name>_<split>`).
    truncate_dev: cut `dev` to its first 1,000 images / 5,000 captions, as SCAN does.
    check_all_finite: check every feature row for NaN/inf instead of a sample.

  Returns:
    a RetrievalSplit with memory-mapped `images [N, R, D]`, `captions [5N, L]` int32,
    `lengths [5N]` and `caption_texts`.
  """
  if split not in SPLITS:
    raise DataError(f"unknown SCAN split {split!r} for {data_name}; use one of "
                    f"{', '.join(SPLITS)}")
  images_path, captions_path = split_paths(root, data_name, split)
  images = open_features(images_path)
  captions = read_caption_lines(captions_path)
  n_rows, n_captions = images.shape[0], len(captions)
  if n_captions == n_rows and n_rows % CAPTIONS_PER_IMAGE == 0:
    images = images[::CAPTIONS_PER_IMAGE]
  elif n_captions != CAPTIONS_PER_IMAGE * n_rows:
    raise DataError(f"{captions_path} has {n_captions} captions for {n_rows} feature rows in "
                    f"{images_path}; SCAN needs exactly {CAPTIONS_PER_IMAGE} captions per image "
                    "(or one row per caption): check that both files are of the same split")
  if split == "dev" and truncate_dev:
    images = images[:DEV_IMAGES]
    captions = captions[:DEV_IMAGES * CAPTIONS_PER_IMAGE]
  check_finite(images, images_path, check_all_finite)
  ids, lengths = vocab.encode_batch(captions, max_len)
  return RetrievalSplit(images=images, captions=ids, lengths=lengths,
                        captions_per_image=CAPTIONS_PER_IMAGE,
                        name=name or f"{data_name}_{split}", caption_texts=captions)


def default_test_split(data_name: str) -> str:
  """COCO is tested on `testall` (5K images, also cut into the 5 folds of 1K); others on `test`."""
  return "testall" if data_name.startswith("coco") else "test"


def load_scan_domain(root: str, data_name: str, vocab: Vocab, max_len: int,
                     test_split: Optional[str] = None, with_dev: bool = True,
                     name: Optional[str] = None, check_all_finite: bool = False) -> DomainData:
  """Reads the train, test and (optionally) dev splits of one SCAN precomp dataset.

  Args:
    root, data_name, vocab, max_len: as for `load_scan_split`.
    test_split: the split used as `test`; default `default_test_split(data_name)`.
    with_dev: also read `dev` (truncated to 1,000 images).
    name: prefix of the split names (default `data_name`).
    check_all_finite: as for `load_scan_split`.

  Returns:
    DomainData(train, test, dev); all splits share the feature shape `[R, D]`.
  """
  prefix = name or data_name
  test_split = test_split or default_test_split(data_name)
  splits = {"train": "train", "test": test_split}
  if with_dev:
    splits["dev"] = "dev"
  loaded = {role: load_scan_split(root, data_name, split, vocab, max_len, f"{prefix}_{split}",
                                  check_all_finite=check_all_finite)
            for role, split in splits.items()}
  shapes = {split: loaded[role].images.shape[1:] for role, split in splits.items()}
  if len(set(shapes.values())) > 1:
    raise DataError(f"{data_name} splits have different feature shapes {shapes}; all "
                    f"*_ims.npy under {os.path.join(root, data_name)} must come from one "
                    "feature extractor")
  return DomainData(**loaded)


_FAKE_WORDS = ("dog", "cat", "horse", "bird", "man", "woman", "child", "car", "bike", "boat",
               "tree", "ball", "beach", "street", "field", "kitchen")
_FAKE_FILLERS = ("a", "the", "is", "on", "in", "with", "near", "and", "red", "small", "two",
                 "running", "sitting", "playing")


def write_fake_scan(root: str, data_name: str, n_images: Union[int, Mapping[str, int]],
                    regions: int = 36, dim: int = 2048, seed: int = 0,
                    splits: tuple[str, ...] = SPLITS, sparse: bool = False) -> str:
  """Writes a small SCAN-layout dataset whose captions are related to their features.

  Each image gets a topic (one of 16 nouns); its region features are the topic's prototype
  plus noise and its 5 captions mention the topic noun, so retrieval is learnable. Features are
  written a chunk of rows at a time, so large fake files need little memory.

  Args:
    root: folder under which `<data_name>/` is created.
    data_name: dataset folder name, e.g. "f30k_precomp".
    n_images: images per split, one number for all or a mapping split -> number.
    regions, dim: R and D of the `[N, R, D]` float32 features.
    seed: seed of the generator (every split uses a different stream).
    splits: the splits to write.
    sparse: leave the features all zero in a sparse file (no disk blocks, written instantly),
      for scale tests of the input pipeline at real sizes (20,000 x 36 x 2048 = 5.9 GB).

  Returns:
    the dataset folder `<root>/<data_name>`.
  """
  folder = os.path.join(root, data_name)
  os.makedirs(folder, exist_ok=True)
  prototypes = np.random.default_rng(seed).standard_normal((len(_FAKE_WORDS), dim))
  for index, split in enumerate(splits):
    n = n_images if isinstance(n_images, int) else n_images[split]
    rng = np.random.default_rng([seed, index])
    topics = rng.integers(len(_FAKE_WORDS), size=n)
    images_path, captions_path = split_paths(root, data_name, split)
    features = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.float32,
                                         shape=(n, regions, dim))
    for start in range(0, 0 if sparse else n, _CHUNK_ROWS):
      block = topics[start:start + _CHUNK_ROWS]
      noise = rng.standard_normal((len(block), regions, dim), dtype=np.float32)
      features[start:start + len(block)] = prototypes[block][:, None, :] + noise
    features.flush()
    del features
    with open(captions_path, "w", encoding="utf-8") as f:
      for topic in topics:
        for _ in range(CAPTIONS_PER_IMAGE):
          words = list(rng.choice(_FAKE_FILLERS, size=rng.integers(3, 9)))
          words.insert(int(rng.integers(len(words) + 1)), _FAKE_WORDS[topic])
          f.write(" ".join(words) + " .\n")
  return folder
