"""TFDS array_record builders on tiny generated inputs (no TensorFlow, offline)."""

import hashlib
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from aeir_jax.data import scan, tfds_builders
from aeir_jax.data.vocab import Vocab
from aeir_jax.errors import DataError


def _sha256(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def scan_root(tmp_path):
  root = tmp_path / "scan"
  scan.write_fake_scan(str(root), "f30k_precomp", {"train": 7, "dev": 3, "test": 2, "testall": 2},
                       regions=3, dim=4)
  return str(root)


def test_scan_precomp_round_trip(scan_root, tmp_path):
  train_caps = scan.read_caption_lines(scan.split_paths(scan_root, "f30k_precomp", "train")[1])
  vocab = Vocab.build(train_caps, threshold=1)
  vocab_path = str(tmp_path / "vocab.json")
  vocab.save(vocab_path)
  builder = tfds_builders.prepare(tfds_builders.ScanPrecomp(
      scan_root=scan_root, data_name="f30k_precomp", vocab=vocab, vocab_path=vocab_path,
      max_len=10, data_dir=str(tmp_path / "tfds")))
  assert set(builder.info.splits) == set(scan.SPLITS)
  images_path, captions_path = scan.split_paths(scan_root, "f30k_precomp", "train")
  features = np.load(images_path)
  ids, lengths = vocab.encode_batch(train_caps, 10)
  # Read back through a fresh builder from the directory alone, as a user later would.
  reread = tfds.builder_from_directory(builder.data_dir)
  for source in (builder.as_data_source("train"), reread.as_data_source("train")):
    assert len(source) == 7
    for i in range(7):
      example = source[i]
      assert example["image_index"] == i
      np.testing.assert_array_equal(example["features"], features[i])
      assert [c.decode() for c in example["captions"]] == train_caps[5 * i:5 * i + 5]
      np.testing.assert_array_equal(example["caption_ids"], ids[5 * i:5 * i + 5])
      np.testing.assert_array_equal(example["caption_lengths"], lengths[5 * i:5 * i + 5])
  inputs = reread.info.metadata["inputs"]
  assert inputs["f30k_precomp/train_ims.npy"]["sha256"] == _sha256(images_path)
  assert inputs["f30k_precomp/train_caps.txt"]["sha256"] == _sha256(captions_path)
  assert len(inputs) == 2 * len(scan.SPLITS)
  settings = reread.info.metadata["settings"]
  assert settings["vocab_file_sha256"] == _sha256(vocab_path) and settings["max_len"] == 10
  assert "sha256" in reread.info.description
  assert len(reread.as_data_source("dev")) == 3  # stored whole


def test_scan_precomp_without_vocab_and_selected_splits(scan_root, tmp_path):
  builder = tfds_builders.prepare(tfds_builders.ScanPrecomp(
      scan_root=scan_root, data_name="f30k_precomp", splits=("test",),
      data_dir=str(tmp_path / "tfds")))
  assert set(builder.info.splits) == {"test"}
  assert set(builder.as_data_source("test")[0]) == {"image_index", "features", "captions"}


def test_scan_precomp_errors(scan_root, tmp_path):
  with pytest.raises(DataError, match="no SCAN split found"):
    tfds_builders.ScanPrecomp(scan_root=str(tmp_path), data_name="f30k_precomp",
                              data_dir=str(tmp_path / "tfds"))
  captions_path = scan.split_paths(scan_root, "f30k_precomp", "test")[1]
  with open(captions_path, "a") as f:
    f.write("one caption too many .\n")
  builder = tfds_builders.ScanPrecomp(scan_root=scan_root, data_name="f30k_precomp",
                                      splits=("test",), data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DataError, match="11 captions for 2 images"):
    tfds_builders.prepare(builder)


@pytest.fixture
def image_folder(tmp_path):
  """6 JPEGs, a token file with one stray line, two split files and a domain table."""
  images = tmp_path / "images"
  images.mkdir()
  names = [f"{i}.jpg" for i in range(6)]
  for i, name in enumerate(names):
    Image.fromarray(np.full((8 + i, 10, 3), 40 * i, np.uint8)).save(images / name)
  lines = [f"{name}#{j}\tImage {name} caption {j} ." for name in names for j in range(5)]
  lines.insert(3, "9.jpg.1#0\tstray")
  (tmp_path / "tokens.txt").write_text("\n".join(lines) + "\n")
  (tmp_path / "train.txt").write_text("3.jpg\n0.jpg\n1.jpg\n2.jpg\n")
  (tmp_path / "test.txt").write_text("4.jpg\n5.jpg\n")
  table = "image\tofficial_split\tdomain\n" + "".join(
      f"{name}\t{'train' if i < 4 else 'test'}\t{'animal' if i % 2 else 'people'}\n"
      for i, name in enumerate(names))
  (tmp_path / "domains.tsv").write_text(table)
  return tmp_path


def _captioned(folder, **kwargs):
  kwargs.setdefault("split_files", {"train": str(folder / "train.txt"),
                                    "test": str(folder / "test.txt")})
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return tfds_builders.prepare(tfds_builders.CaptionedImages(
        name="tiny", images_dir=str(folder / "images"), captions_path=str(folder / "tokens.txt"),
        data_dir=str(folder / "tfds"), **kwargs))


def test_captioned_images_with_jpeg_bytes(image_folder):
  builder = _captioned(image_folder, domain_table=str(image_folder / "domains.tsv"))
  train = builder.as_data_source("train")
  assert [train[i]["image_name"].decode() for i in range(4)] == ["3.jpg", "0.jpg", "1.jpg",
                                                                 "2.jpg"]
  first = train[0]
  assert first["image"].shape == (11, 10, 3) and first["image"].dtype == np.uint8
  assert [c.decode() for c in first["captions"]] == [f"Image 3.jpg caption {j} ."
                                                      for j in range(5)]
  assert first["domain"].decode() == "animal" and train[1]["domain"].decode() == "people"
  inputs = tfds.builder_from_directory(builder.data_dir).info.metadata["inputs"]
  assert inputs["captions_file"]["sha256"] == _sha256(image_folder / "tokens.txt")
  assert inputs["split_file/test"]["sha256"] == _sha256(image_folder / "test.txt")
  assert inputs["domain_table"]["sha256"] == _sha256(image_folder / "domains.tsv")
  assert inputs["images"]["count"] == 6


def test_captioned_images_paths_and_splits_from_domain_table(image_folder):
  builder = _captioned(image_folder, split_files={}, store="path",
                       domain_table=str(image_folder / "domains.tsv"))
  test = builder.as_data_source("test")
  assert len(test) == 2 and len(builder.as_data_source("train")) == 4
  assert test[1]["image_path"].decode() == "5.jpg" and "image" not in test[1]
  assert builder.info.metadata["settings"]["store"] == "path"


def test_captioned_images_errors(image_folder):
  with pytest.raises(DataError, match="needs split_files or a domain table"):
    _captioned(image_folder, split_files={})
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image_folder / "images" / "5.jpg",
                                                      format="PNG")
  with pytest.raises(DataError, match="5.jpg is not a JPEG file"):
    _captioned(image_folder)
  (image_folder / "images" / "4.jpg").unlink()
  with pytest.raises(DataError, match="missing from"):
    _captioned(image_folder)


def test_command_line(scan_root, tmp_path, capsys):
  tfds_builders.main(["scan", "--scan_root", scan_root, "--data_name", "f30k_precomp",
                      "--data_dir", str(tmp_path / "tfds")])
  data_dir = capsys.readouterr().out.strip().splitlines()[-1]
  assert len(tfds.builder_from_directory(data_dir).as_data_source("testall")) == 2
