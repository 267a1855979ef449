"""Flickr8k (or any captioned image set with a domain table) as a two-domain transfer task.

A domain table (Flickr8k's `domain_split.tsv`: `animal`, `people_scene`, `ambiguous`) gives
each image a domain; `data.flickr8k.source_domain` and `target_domain` pick two of them and
images of any other domain are left out. With the split files (one image name per line):
  source train  = train x source domain, paired;
  source test   = test x source domain;
  target train  = train x target domain, which the trainer samples unpaired;
  target dev    = dev x target domain (model selection);
  target test   = test x target domain (reporting only).

Captions come from the caption file (`read_captions_file`: Flickr8k token format or CSV/TSV),
5 per image, checked for every selected image. The real token file has one stray line,
`2258277193_586949ec62.jpg.1#0` (a typo of `...jpg#0`): it is skipped with a warning, and its
image, left with 4 captions, is none of the 8,091 released photos and in no split, so it is
never read; feature rows are looked up by caption key, so its rows are never read either.

Features (`data.flickr8k.features`):
  precomputed  the shipped EfficientNet-Lite0 image features (`image_regions`: `grid2x2`,
               `[N, 4, 1280]`, or `pooled`, `[N, 1, 1280]`) and L2-normalised MiniLM sentence
               embeddings as 1-fragment captions `[5N, 1, 384]`; rows in the order of
               `f8k_image_names.txt` and `f8k_caption_keys.txt`.
  extracted    `image_features` and `caption_features` in `features_dir`, written by
               `aeir_jax.tools.extract`, rows in the order of their `<stem>.order.txt`:
                 python -m aeir_jax.tools.extract images --folder PHOTOS --grid 2x2 \\
                     --out FEATURES_DIR/images_2x2.npy
                 python -m aeir_jax.tools.extract captions --captions ROOT/Flickr8k.token.txt \\
                     --tokens --out FEATURES_DIR/captions_tokens.npy
               Images `[N, R, D]` (`--grid 2x2|7x7`) or `[N, D]` (`pooled`, one region);
               captions `[N, L, 384]` token fragments with `<stem>.lengths.npy` (`--tokens`)
               or `[N, 384]` sentence embeddings (one fragment).
  tokens       images as for `precomputed`; captions as token ids `[5N, L]`: with
               `model.text_encoder='gru'` ids of a vocabulary built from the source and target
               TRAIN captions only (`aeir_jax.data.vocab`, words seen `vocab_threshold` times,
               at most `max_len` ids); with `model.text_encoder='minilm'` MiniLM WordPiece ids.
Feature arrays are memory-mapped and read a batch of rows at a time (`RowView`), as float32.
"""

from __future__ import annotations

import os

import numpy as np

from aeir_jax.data.base import DomainData, RetrievalSplit, TransferData
from aeir_jax.data.captions_file import read_captions_file, read_domain_table, read_split_file
from aeir_jax.data.vocab import Vocab
from aeir_jax.errors import ConfigError, DataError

CAPTIONS_PER_IMAGE = 5
FEATURES = ("precomputed", "extracted", "tokens")
SHIPPED_IMAGES = {"grid2x2": "f8k_effnetlite0_grid2x2_fp16.npy",
                  "pooled": "f8k_effnetlite0_pooled_fp16.npy"}
SHIPPED_IMAGE_ORDER = "f8k_image_names.txt"
SHIPPED_CAPTIONS = "f8k_minilm_caption_emb_fp16.npy"
SHIPPED_CAPTION_ORDER = "f8k_caption_keys.txt"
SPLITS = ("train", "dev", "test")
# (split name, which split file, which domain)
PARTS = (("source_train", "train", "source"), ("source_test", "test", "source"),
         ("target_train", "train", "target"), ("target_dev", "dev", "target"),
         ("target_test", "test", "target"))


class RowView:
  """Rows `rows` of a (memory-mapped) array, read on demand as a `[len(rows), ...]` array.

  Indexing with an int, a slice or an index array reads only those rows (in sorted order,
  sequential on a memmap) and returns float32 for float arrays. With `one_fragment` a 2-D
  array `[N, D]` reads as `[N, 1, D]`.
  """

  def __init__(self, array: np.ndarray, rows, one_fragment: bool = False):
    self._array = array
    self._rows = np.asarray(rows, np.int64)
    inner = (1,) + array.shape[1:] if one_fragment else array.shape[1:]
    self.shape = (len(self._rows),) + inner
    floating = np.issubdtype(array.dtype, np.floating)
    self.dtype = np.dtype(np.float32) if floating else array.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    rows = self._rows[key]
    flat = np.atleast_1d(rows)
    order = np.argsort(flat, kind="stable")
    out = np.empty((len(flat),) + self.shape[1:], self.dtype)
    out[order] = np.asarray(self._array[flat[order]]).reshape((len(flat),) + self.shape[1:])
    return out[0] if rows.ndim == 0 else out


def _path(root: str, name: str) -> str:
  return os.path.join(root, name)


def _open_array(path: str, what: str) -> np.ndarray:
  """Memory-maps a `.npy` array read-only."""
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except FileNotFoundError:
    raise DataError(f"{what} {path} does not exist; check data.flickr8k (see "
                    "aeir_jax/data/flickr8k.py for the files each features= variant reads)"
                    ) from None
  except ValueError as e:
    raise DataError(f"{what} {path} is not a readable .npy array ({e}); write it again") from None
  if array.ndim < 2 or array.shape[0] == 0:
    raise DataError(f"{what} {path} has shape {array.shape}, expected [rows, ...features]; "
                    "write it again")
  return array


def _row_index(order_path: str, array: np.ndarray, array_path: str) -> dict:
  """name -> row of `array`, from an order file listing one row name per line."""
  try:
    with open(order_path, encoding="utf-8") as f:
      names = [line.rstrip("\r\n") for line in f]
  except FileNotFoundError:
    raise DataError(f"row order file {order_path} does not exist; it must list the rows of "
                    f"{array_path}, one name per line") from None
  if names and not names[-1]:
    names.pop()
  if len(names) != array.shape[0]:
    raise DataError(f"{order_path} lists {len(names)} rows but {array_path} has "
                    f"{array.shape[0]}; use the order file written with that array")
  index = {name: row for row, name in enumerate(names)}
  if len(index) != len(names):
    raise DataError(f"{order_path} lists a row name twice; use the order file written with "
                    f"{array_path}")
  return index


def _rows_of(index: dict, keys, order_path: str) -> np.ndarray:
  try:
    return np.asarray([index[key] for key in keys], np.int64)
  except KeyError as e:
    raise DataError(f"{order_path} has no row for {e.args[0]}; the features were computed "
                    "for other images or captions: extract them again for this data") from None


def _caption_keys(names) -> list:
  return [f"{name}#{i}" for name in names for i in range(CAPTIONS_PER_IMAGE)]


def _select(cfg, root):
  """{part: image names} for `PARTS`, from the split files and the domain table."""
  split_names, seen = {}, {}
  for split in SPLITS:
    path = _path(root, cfg.split_files[split])
    split_names[split] = read_split_file(path)
    for name in split_names[split]:
      if name in seen:
        raise DataError(f"image {name} is in both the {seen[name]} and the {split} split files "
                        f"({path}); each image belongs to one split")
      seen[name] = split
  table_path = _path(root, cfg.domain_file)
  table = read_domain_table(table_path)
  domain_of = dict(zip(table.names, table.domains))
  for field in ("source_domain", "target_domain"):
    if cfg[field] not in set(table.domains):
      raise ConfigError(f"data.flickr8k.{field}={cfg[field]!r} is not a domain of {table_path}; "
                        f"use one of {', '.join(sorted(set(table.domains)))}")
  if cfg.source_domain == cfg.target_domain:
    raise ConfigError(f"data.flickr8k.source_domain and target_domain are both "
                      f"{cfg.source_domain!r}; pick two different domains")
  missing = [name for names in split_names.values() for name in names if name not in domain_of]
  if missing:
    raise DataError(f"{len(missing)} image(s) of the split files are not in the domain table "
                    f"{table_path}, e.g. {missing[0]}; use the table made for these splits")
  domains = {"source": cfg.source_domain, "target": cfg.target_domain}
  parts = {}
  for part, split, role in PARTS:
    names = [n for n in split_names[split] if domain_of[n] == domains[role]]
    if not names:
      raise DataError(f"no {split} image of domain {domains[role]!r} in {table_path}; pick "
                      "domains that every split has")
    parts[part] = names[:cfg.subset] if cfg.subset > 0 else names
  return parts


def _image_source(cfg, root):
  """(array, name -> row, order path) of the configured image features."""
  if cfg.features == "extracted":
    path = _path(_features_dir(cfg), cfg.image_features)
    order = path[:-len(".npy")] + ".order.txt"
  else:
    if cfg.image_regions not in SHIPPED_IMAGES:
      raise ConfigError(f"data.flickr8k.image_regions={cfg.image_regions!r} is not one of "
                        f"{', '.join(SHIPPED_IMAGES)}; set --config.data.flickr8k.image_regions")
    path = _path(root, SHIPPED_IMAGES[cfg.image_regions])
    order = _path(root, SHIPPED_IMAGE_ORDER)
  array = _open_array(path, "image feature file")
  return array, _row_index(order, array, path), order


def _features_dir(cfg) -> str:
  if not cfg.features_dir:
    raise ConfigError("data.flickr8k.features='extracted' needs data.flickr8k.features_dir, the "
                      "folder of the aeir_jax.tools.extract outputs; set "
                      "--config.data.flickr8k.features_dir=DIR")
  return cfg.features_dir


def _caption_features(cfg, root):
  """(array, name -> row, order path, lengths or None) of the configured caption features."""
  if cfg.features == "extracted":
    path = _path(_features_dir(cfg), cfg.caption_features)
    stem = path[:-len(".npy")]
    order = stem + ".order.txt"
  else:
    path, order, stem = _path(root, SHIPPED_CAPTIONS), _path(root, SHIPPED_CAPTION_ORDER), None
  array = _open_array(path, "caption feature file")
  lengths = None
  if array.ndim == 3:
    lengths_path = stem + ".lengths.npy" if stem else ""
    if not stem or not os.path.exists(lengths_path):
      raise DataError(f"caption fragments {path} need their lengths {lengths_path or '[N]'}; "
                      "extract them with --tokens, which writes both")
    lengths = np.load(lengths_path)
    if lengths.shape != array.shape[:1]:
      raise DataError(f"{lengths_path} has shape {lengths.shape}, expected [{array.shape[0]}] "
                      f"for {path}; extract both again")
  elif array.ndim != 2:
    raise DataError(f"caption feature file {path} has shape {array.shape}; expected sentence "
                    "embeddings [N, D] or token fragments [N, L, D]")
  return array, _row_index(order, array, path), order, lengths


def _token_ids(config, texts: dict, train_parts):
  """{part: (ids [5N, L], lengths [5N])} and (vocab_size, words) for `features='tokens'`."""
  cfg = config.data.flickr8k
  parts = list(texts)
  flat = [caption for part in parts for caption in texts[part]]
  if config.model.text_encoder == "minilm":
    from aeir_jax.models.minilm import load_minilm, MiniLM  # pylint: disable=g-import-not-at-top
    ids, mask = load_minilm()[0](flat)
    lengths, vocab_size, words = mask.sum(1).astype(np.int32), MiniLM.vocab_size, None
  else:
    vocab = Vocab.build([c for part in train_parts for c in texts[part]], cfg.vocab_threshold)
    ids, lengths = vocab.encode_batch(flat, cfg.max_len)
    vocab_size, words = len(vocab), vocab.words
  out, start = {}, 0
  for part in parts:
    stop = start + len(texts[part])
    out[part] = (ids[start:stop], lengths[start:stop])
    start = stop
  return out, vocab_size, words


def load_transfer(config) -> TransferData:
  """The `data.name='flickr8k'` loader: source/target splits of `config.data.flickr8k`."""
  cfg = config.data.flickr8k
  if cfg.features not in FEATURES:
    raise ConfigError(f"data.flickr8k.features={cfg.features!r} is not one of "
                      f"{', '.join(FEATURES)}; set --config.data.flickr8k.features")
  root = cfg.root
  if not os.path.isdir(root):
    raise DataError(f"Flickr8k folder {root} does not exist; set "
                    "--config.data.flickr8k.root to the folder holding the caption, split and "
                    "domain files")
  parts = _select(cfg, root)
  every = [name for names in parts.values() for name in names]
  grouped = read_captions_file(_path(root, cfg.captions_file), CAPTIONS_PER_IMAGE, images=every)
  by_name = dict(zip(grouped.names, grouped.captions))
  texts = {part: [c for name in names for c in by_name[name]] for part, names in parts.items()}

  image_array, image_index, image_order = _image_source(cfg, root)
  one_region = image_array.ndim == 2
  captions = {}
  if cfg.features == "tokens":
    captions, vocab_size, words = _token_ids(config, texts, ("source_train", "target_train"))
    caption_dim = 0
  else:
    array, index, order, lengths = _caption_features(cfg, root)
    for part, names in parts.items():
      rows = _rows_of(index, _caption_keys(names), order)
      part_lengths = (np.ones(len(rows), np.int32) if lengths is None
                      else np.asarray(lengths[rows], np.int32))
      captions[part] = (RowView(array, rows, one_fragment=array.ndim == 2), part_lengths)
    vocab_size, words, caption_dim = 0, None, int(array.shape[-1])

  splits = {}
  for part, names in parts.items():
    images = RowView(image_array, _rows_of(image_index, names, image_order),
                     one_fragment=one_region)
    ids, lengths = captions[part]
    splits[part] = RetrievalSplit(images=images, captions=ids, lengths=lengths,
                                  captions_per_image=CAPTIONS_PER_IMAGE, name=part,
                                  image_ids=list(names), caption_texts=texts[part])
  return TransferData(
      source=DomainData(train=splits["source_train"], test=splits["source_test"]),
      target=DomainData(train=splits["target_train"], test=splits["target_test"],
                        dev=splits["target_dev"]),
      vocab_size=vocab_size, image_dim=int(image_array.shape[-1]), caption_dim=caption_dim,
      words=words)
