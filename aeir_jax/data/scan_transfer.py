"""Transfer between two SCAN precomp datasets (`data.name='scan'`): F30K <-> COCO as in AECR.

`load_transfer(config)` reads a paired source and an unpaired target domain from
`config.data.scan` (see `scan_data_config`):

  root                  folder holding `<source>/` and `<target>/` in SCAN's precomp layout
                        (`<split>_ims.npy`, `<split>_caps.txt`; docs/data.md);
  source, target        dataset folder names, e.g. 'f30k_precomp', 'coco_precomp';
  vocab_path            a SCAN/AECR vocabulary json (AECR: `vocab/common_precomp_vocab.json`);
                        empty: built from the source and target TRAIN captions (decoded text,
                        whatever the bug switch), words seen at least `vocab_threshold` times;
  max_len               caption width L in ids (with `<start>`/`<end>`); longer captions keep
                        their first L - 1 ids and `<end>`;
  tokenize_bytes_repr_bug  tokenise `str(caption_bytes)` as the reference does (docs/method.md 1.5);
  source_test_split, target_test_split  the test split per domain; empty: COCO `testall`
                        (5K, and 5 folds of 1K), others `test`;
  with_dev              also read each domain's `dev` split (first 1,000 images);
  check_all_finite      check every feature row for NaN/inf (default: 64 rows per file);
  fake.train_images     > 0: read a generated SCAN-format dataset instead (written once to a
                        cache folder under the system temp dir; `root` is not read), with
                        `fake.test_images` images per test/dev split and `[fake.regions,
                        fake.dim]` features per image.

Features stay memory-mapped: only the rows of a batch are ever read. The trainer draws the
target's train images and captions independently, so its pairing is never used.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import zlib

import ml_collections

from aeir_jax.data.base import TransferData
from aeir_jax.data.scan import (SPLITS, load_scan_domain, read_caption_lines, split_paths,
                                write_fake_scan)
from aeir_jax.data.vocab import Vocab
from aeir_jax.errors import ConfigError, DataError

# Scenario name -> (source, target) dataset folders.
SCENARIOS = {"f30k2coco": ("f30k_precomp", "coco_precomp"),
             "coco2f30k": ("coco_precomp", "f30k_precomp")}
# SCAN's train caption counts: one epoch = one pass over them (docs/method.md 1.3).
TRAIN_CAPTIONS = {"f30k_precomp": 145_000, "coco_precomp": 566_435}
# The standard test protocols of each dataset (metric key prefixes of `protocols.STANDARD`).
TEST_PROTOCOLS = {"f30k_precomp": ("f30k_1k",), "coco_precomp": ("coco_5fold1k", "coco_5k")}


def scan_data_config(source: str, target: str) -> ml_collections.ConfigDict:
  """`config.data.scan` for a source -> target transfer, with the clean defaults."""
  return ml_collections.ConfigDict(dict(
      root="", source=source, target=target, vocab_path="", vocab_threshold=4, max_len=50,
      tokenize_bytes_repr_bug=False, source_test_split="", target_test_split="",
      with_dev=True, check_all_finite=False,
      fake=dict(train_images=0, test_images=10, regions=36, dim=2048),
  ))


def steps_per_epoch(num_captions: int, batch: int) -> int:
  """Batches in one pass over `num_captions`, the last partial one counted (as the reference)."""
  return math.ceil(num_captions / batch)


def _fake_root(fake, names) -> str:
  """A cached generated dataset holding `names`; written once, atomically (rename)."""
  tag = f"train{fake.train_images}_test{fake.test_images}_r{fake.regions}_d{fake.dim}"
  root = os.path.join(tempfile.gettempdir(), "aeir_jax_fake_scan", tag)
  sizes = {split: fake.train_images if split == "train" else fake.test_images
           for split in SPLITS}
  for name in names:
    if os.path.isdir(os.path.join(root, name)):
      continue
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(dir=root, prefix=f".{name}.")
    write_fake_scan(staging, name, sizes, regions=fake.regions, dim=fake.dim,
                    seed=zlib.crc32(name.encode()))
    try:
      os.rename(os.path.join(staging, name), os.path.join(root, name))
    except OSError:
      pass  # another process finished the same dataset first
    shutil.rmtree(staging, ignore_errors=True)
  return root


def _check_fields(sc) -> None:
  if not sc.source or not sc.target:
    raise ConfigError("data.scan.source and data.scan.target must name SCAN dataset folders, "
                      "e.g. --config.data.scan.source=f30k_precomp")
  if sc.max_len < 2:
    raise ConfigError(f"data.scan.max_len={sc.max_len} must be >= 2 (<start> and <end>); "
                      "set --config.data.scan.max_len=50")
  if sc.vocab_threshold < 1:
    raise ConfigError(f"data.scan.vocab_threshold={sc.vocab_threshold} must be >= 1")
  for field in ("source_test_split", "target_test_split"):
    if sc[field] and sc[field] not in SPLITS:
      raise ConfigError(f"data.scan.{field}={sc[field]!r} is not one of {', '.join(SPLITS)}")
  if sc.fake.train_images < 0 or (sc.fake.train_images and sc.fake.test_images < 1):
    raise ConfigError("data.scan.fake.train_images must be >= 0 and fake.test_images >= 1")


def _real_root(sc) -> str:
  if not sc.root:
    raise ConfigError("data.scan.root is empty; set --config.data.scan.root to the folder "
                      f"holding {sc.source}/ and {sc.target}/ (SCAN precomp layout, see "
                      "docs/data.md)")
  root = os.path.abspath(os.path.expanduser(sc.root))
  for name in (sc.source, sc.target):
    if not os.path.isdir(os.path.join(root, name)):
      raise DataError(f"data.scan.root={root} has no folder {name}/; expected "
                      f"{root}/{name}/<split>_ims.npy and <split>_caps.txt for the splits "
                      "train, dev, test (COCO also testall), see docs/data.md; fix "
                      "--config.data.scan.root or data.scan.source/target")
  return root


def _vocab(sc, root) -> Vocab:
  if sc.vocab_path:
    return Vocab.load(os.path.expanduser(sc.vocab_path), sc.tokenize_bytes_repr_bug)
  captions = []
  for name in (sc.source, sc.target):
    captions += read_caption_lines(split_paths(root, name, "train")[1])
  # The words come from the decoded text, as SCAN built its vocabularies; the bug (if on)
  # applies to encoding only, as in the reference.
  return Vocab(Vocab.build(captions, sc.vocab_threshold).words, sc.tokenize_bytes_repr_bug)


def load_transfer(config) -> TransferData:
  """Reads `config.data.scan` (module docstring) into memory-mapped source and target domains.

  Returns:
    TransferData whose domains hold `train`, `test` (and `dev`) splits with images
    `[N, R, D]` (memmap), caption ids `[5N, max_len]` and lengths `[5N]`; split names are
    `<dataset>_<split>`, e.g. `coco_precomp_testall`.
  """
  sc = config.data.scan
  _check_fields(sc)
  root = _fake_root(sc.fake, (sc.source, sc.target)) if sc.fake.train_images else _real_root(sc)
  vocab = _vocab(sc, root)
  domains = {}
  for role, name in (("source", sc.source), ("target", sc.target)):
    domains[role] = load_scan_domain(root, name, vocab, sc.max_len,
                                     test_split=sc[f"{role}_test_split"] or None,
                                     with_dev=sc.with_dev, check_all_finite=sc.check_all_finite)
  shapes = {role: domain.train.images.shape[1:] for role, domain in domains.items()}
  if shapes["source"] != shapes["target"]:
    raise DataError(f"source {sc.source} has region features [R, D] = {shapes['source']} but "
                    f"target {sc.target} {shapes['target']}; both must come from one feature "
                    "extractor")
  return TransferData(source=domains["source"], target=domains["target"],
                      vocab_size=len(vocab), image_dim=int(shapes["source"][-1]),
                      words=vocab.words)
