"""TFDS builders (array_record, no TensorFlow) for SCAN precomp folders and captioned images.

Both builders read local files only, are prepared offline and read with random access:

    builder = ScanPrecomp(scan_root="data", data_name="f30k_precomp", vocab=vocab,
                          data_dir="tfds_data")
    prepare(builder)                      # download_and_prepare, offline
    test = builder.as_data_source("test")  # len(test), test[i] -> dict of numpy arrays
    # later, without the inputs: tfds.builder_from_directory(builder.data_dir)

One example per image, in input order (shuffling disabled):
  * `ScanPrecomp` (`scan_precomp/<data_name>`): `image_index`, `features [R, D]`, `captions [5]`
    (text) and, with a vocabulary, `caption_ids [5, max_len]` int32 and `caption_lengths [5]`.
    Every split found is stored whole (SCAN's loader cuts `dev` to 1,000 images at read time).
  * `CaptionedImages` (`captioned_images/<name>`): `image_name`, `image` (the JPEG bytes as
    stored, decoded on read) or `image_path` (relative to the image folder), `captions [5]`,
    `domain` (if known) and optional ids as above.

Provenance: the sha256 and size of every input file (for image folders, one digest over the
sorted `name sha256` lines of all stored images) are recorded in the dataset's
`metadata.json` under `inputs`, together with the conversion settings; the description says so.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
from typing import Mapping, Optional

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from aeir_jax.data import captions_file, scan
from aeir_jax.data.vocab import Vocab
from aeir_jax.errors import DataError

VERSION = tfds.core.Version("1.0.0")
_HASH_BLOCK = 1 << 20


def sha256_file(path: str) -> str:
  """Hex sha256 of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_HASH_BLOCK), b""):
      digest.update(block)
  return digest.hexdigest()


def _file_record(path: str) -> dict:
  return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def _caption_features(captions_per_image: int, max_len: Optional[int]) -> dict:
  features = {"captions": tfds.features.Tensor(shape=(captions_per_image,), dtype=np.object_)}
  if max_len is not None:
    features["caption_ids"] = tfds.features.Tensor(shape=(captions_per_image, max_len),
                                                   dtype=np.int32)
    features["caption_lengths"] = tfds.features.Tensor(shape=(captions_per_image,),
                                                       dtype=np.int32)
  return features


def _encode_captions(captions: list, vocab: Optional[Vocab], max_len: int) -> dict:
  example = {"captions": np.asarray(captions, dtype=np.object_)}
  if vocab is not None:
    example["caption_ids"], example["caption_lengths"] = vocab.encode_batch(captions, max_len)
  return example


def _vocab_metadata(vocab: Optional[Vocab], vocab_path: Optional[str], max_len: int) -> dict:
  if vocab is None:
    return {}
  return {"vocab_size": len(vocab), "max_len": max_len, "vocab_file": vocab_path,
          "vocab_file_sha256": sha256_file(vocab_path) if vocab_path else None,
          "tokenize_bytes_repr_bug": vocab.tokenize_bytes_repr_bug}


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of the builders here: local inputs, no download."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10 resolves the code path of a builder defined in a package through the
    # `importlib_resources` backport, which is only installed for Python < 3.9.
    return epath.Path(inspect.getfile(cls))


_PROVENANCE = ("The sha256 and size of every input file, and the conversion settings, are in "
               "metadata.json ('inputs', 'settings').")


class ScanPrecomp(_LocalBuilder):
  """A SCAN precomp folder `<scan_root>/<data_name>/` as array_record, one example per image."""

  VERSION = VERSION

  def __init__(self, *, scan_root: str, data_name: str, vocab: Optional[Vocab] = None,
               vocab_path: Optional[str] = None, max_len: int = 64,
               splits: Optional[tuple] = None, **kwargs):
    """Args:
      scan_root: folder holding `<data_name>/<split>_{ims.npy,caps.txt}`.
      data_name: e.g. "f30k_precomp"; also the builder config name.
      vocab: if given, caption ids are stored too (`vocab_path` is then recorded).
      vocab_path: the file `vocab` was loaded from, for provenance.
      max_len: width of the stored caption ids.
      splits: the splits to convert; default every split of `scan.SPLITS` present.
      **kwargs: tfds builder arguments (data_dir, file_format, ...).
    """
    self._folder = os.path.join(scan_root, data_name)
    self._scan_root, self._data_name = scan_root, data_name
    self._vocab, self._vocab_path, self._max_len = vocab, vocab_path, max_len
    present = [s for s in scan.SPLITS
               if all(os.path.exists(p) for p in scan.split_paths(scan_root, data_name, s))]
    self._splits = tuple(splits) if splits else tuple(present)
    if not self._splits:
      raise DataError(f"no SCAN split found in {self._folder}; expected files like "
                      "train_ims.npy and train_caps.txt (see docs/data.md)")
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=tfds.core.BuilderConfig(name=data_name), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    images = scan.open_features(scan.split_paths(self._scan_root, self._data_name,
                                                 self._splits[0])[0])
    features = {"image_index": tfds.features.Scalar(dtype=np.int64),
                "features": tfds.features.Tensor(shape=images.shape[1:], dtype=images.dtype),
                **_caption_features(scan.CAPTIONS_PER_IMAGE,
                                    self._max_len if self._vocab else None)}
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"SCAN precomputed region features and captions of {self._data_name}, "
                     "one example per image. " + _PROVENANCE),
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    inputs = {}
    for split in self._splits:
      for path in scan.split_paths(self._scan_root, self._data_name, split):
        inputs[f"{self._data_name}/{os.path.basename(path)}"] = _file_record(path)
    self.info.metadata["inputs"] = inputs
    self.info.metadata["settings"] = {
        "source": "SCAN precomp", "data_name": self._data_name,
        **_vocab_metadata(self._vocab, self._vocab_path, self._max_len)}
    return {split: self._generate_examples(split) for split in self._splits}

  def _generate_examples(self, split):
    images_path, captions_path = scan.split_paths(self._scan_root, self._data_name, split)
    images = scan.open_features(images_path)
    captions = scan.read_caption_lines(captions_path)
    if len(captions) != scan.CAPTIONS_PER_IMAGE * images.shape[0]:
      raise DataError(f"{captions_path} has {len(captions)} captions for {images.shape[0]} "
                      f"images in {images_path}; expected {scan.CAPTIONS_PER_IMAGE} per image")
    if images.shape[1:] != self.info.features["features"].shape:
      raise DataError(f"{images_path} has rows of shape {images.shape[1:]}, but "
                      f"{self._splits[0]} has {self.info.features['features'].shape}; all "
                      "splits must come from one feature extractor")
    scan.check_finite(images, images_path)
    cpi = scan.CAPTIONS_PER_IMAGE
    for i in range(images.shape[0]):
      yield i, {"image_index": i, "features": np.asarray(images[i]),
                **_encode_captions(captions[i * cpi:(i + 1) * cpi], self._vocab, self._max_len)}


def _is_jpeg(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(3) == b"\xff\xd8\xff"


class CaptionedImages(_LocalBuilder):
  """A folder of images with a caption file (and split files / domain table) as array_record."""

  VERSION = VERSION

  def __init__(self, *, name: str, images_dir: str, captions_path: str,
               split_files: Optional[Mapping[str, str]] = None,
               domain_table: Optional[str] = None, store: str = "bytes",
               captions_per_image: int = 5, vocab: Optional[Vocab] = None,
               vocab_path: Optional[str] = None, max_len: int = 64, **kwargs):
    """Args:
      name: config name, e.g. "flickr8k".
      images_dir: the folder of image files named as in the caption file.
      captions_path: caption file (see `captions_file.read_captions_file`).
      split_files: split name -> split file; default: the `official_split` column of
        `domain_table`.
      domain_table: optional TSV with `image`, `domain` (and `official_split`) columns.
      store: "bytes" (the JPEG files themselves) or "path" (names relative to images_dir).
      captions_per_image: captions each image must have.
      vocab, vocab_path, max_len: as for `ScanPrecomp`.
      **kwargs: tfds builder arguments (data_dir, file_format, ...).
    """
    if store not in ("bytes", "path"):
      raise ValueError(f"store must be 'bytes' or 'path', got {store!r}")
    self._images_dir, self._captions_path = images_dir, captions_path
    self._split_files, self._domain_table_path = dict(split_files or {}), domain_table
    self._store, self._cpi = store, captions_per_image
    self._vocab, self._vocab_path, self._max_len = vocab, vocab_path, max_len
    self._table = captions_file.read_domain_table(domain_table) if domain_table else None
    if self._split_files:
      self._split_names = {split: captions_file.read_split_file(path)
                           for split, path in self._split_files.items()}
    elif self._table is not None and self._table.splits is not None:
      self._split_names = {split: self._table.select(split=split)
                           for split in dict.fromkeys(self._table.splits)}
    else:
      raise DataError("CaptionedImages needs split_files or a domain table with an "
                      "'official_split' column to know which image is in which split")
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {"image_name": tfds.features.Text(),
                **_caption_features(self._cpi, self._max_len if self._vocab else None)}
    if self._store == "bytes":
      features["image"] = tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
    else:
      features["image_path"] = tfds.features.Text()
    features["domain"] = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Images with their captions, one example per image; `domain` is empty "
                     "when no domain is known. " + _PROVENANCE),
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    wanted = [name for names in self._split_names.values() for name in names]
    captions_file.check_images_exist(wanted, self._images_dir)
    grouped = captions_file.read_captions_file(self._captions_path, self._cpi, images=wanted)
    captions = dict(zip(grouped.names, grouped.captions))
    domains = dict(zip(grouped.names, grouped.domains)) if grouped.domains else {}
    if self._table is not None:
      domains.update(zip(self._table.names, self._table.domains))
    image_digest = hashlib.sha256()
    for name in sorted(set(wanted)):
      path = os.path.join(self._images_dir, name)
      if self._store == "bytes" and not _is_jpeg(path):
        raise DataError(f"{path} is not a JPEG file; convert it to JPEG or build with "
                        "store='path'")
      image_digest.update(f"{name} {sha256_file(path)}\n".encode())
    inputs = {"captions_file": _file_record(self._captions_path),
              "images": {"sha256_of_name_sha256_lines": image_digest.hexdigest(),
                         "count": len(set(wanted))}}
    for split, path in self._split_files.items():
      inputs[f"split_file/{split}"] = _file_record(path)
    if self._domain_table_path:
      inputs["domain_table"] = _file_record(self._domain_table_path)
    self.info.metadata["inputs"] = inputs
    self.info.metadata["settings"] = {
        "source": "captioned images", "images_dir": os.path.abspath(self._images_dir),
        "store": self._store, "captions_per_image": self._cpi,
        **_vocab_metadata(self._vocab, self._vocab_path, self._max_len)}
    return {split: self._generate_examples(names, captions, domains)
            for split, names in self._split_names.items()}

  def _generate_examples(self, names, captions, domains):
    for i, name in enumerate(names):
      example = {"image_name": name, "domain": domains.get(name, ""),
                 **_encode_captions(captions[name], self._vocab, self._max_len)}
      if self._store == "bytes":
        example["image"] = os.path.join(self._images_dir, name)
      else:
        example["image_path"] = name
      yield i, example


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Writes the dataset offline (no GCS look-up, nothing downloaded) and returns the builder."""
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def main(argv=None) -> None:
  """Command line: convert a SCAN precomp folder or a captioned image folder."""
  parser = argparse.ArgumentParser(prog="python -m aeir_jax.data.tfds_builders",
                                   description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  scan_parser = commands.add_parser("scan", help="a SCAN precomp folder")
  scan_parser.add_argument("--scan_root", required=True)
  scan_parser.add_argument("--data_name", required=True)
  images_parser = commands.add_parser("images", help="a folder of images with captions")
  images_parser.add_argument("--name", required=True)
  images_parser.add_argument("--images_dir", required=True)
  images_parser.add_argument("--captions", required=True)
  images_parser.add_argument("--split", action="append", default=[], metavar="NAME=FILE",
                             help="a split file, repeatable")
  images_parser.add_argument("--domain_table")
  images_parser.add_argument("--store", choices=("bytes", "path"), default="bytes")
  for sub in (scan_parser, images_parser):
    sub.add_argument("--data_dir", required=True, help="where the tfds dataset is written")
    sub.add_argument("--vocab", help="vocabulary json; store caption ids too")
    sub.add_argument("--max_len", type=int, default=64)
  args = parser.parse_args(argv)
  vocab = Vocab.load(args.vocab) if args.vocab else None
  common = dict(vocab=vocab, vocab_path=args.vocab, max_len=args.max_len,
                data_dir=args.data_dir)
  if args.command == "scan":
    builder = ScanPrecomp(scan_root=args.scan_root, data_name=args.data_name, **common)
  else:
    split_files = dict(item.split("=", 1) for item in args.split)
    builder = CaptionedImages(name=args.name, images_dir=args.images_dir,
                              captions_path=args.captions, split_files=split_files,
                              domain_table=args.domain_table, store=args.store, **common)
  prepare(builder)
  print(builder.data_dir)


if __name__ == "__main__":
  main()
