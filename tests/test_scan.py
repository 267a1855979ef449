"""SCAN precomp reader: layout, lazy reads, validation, and the fake-data writer."""

import os

import numpy as np
import pytest

from aeir_jax.data import scan
from aeir_jax.data.base import DomainData, RetrievalSplit
from aeir_jax.data.vocab import SPECIAL_TOKENS, Vocab
from aeir_jax.errors import DataError

VOCAB = Vocab(list(SPECIAL_TOKENS) + list(scan._FAKE_WORDS) + list(scan._FAKE_FILLERS) + ["."])


def _write_split(root, data_name, split, images, captions, raw=None):
  """Writes `<split>_ims.npy` and `<split>_caps.txt` (or raw caption bytes)."""
  images_path, captions_path = scan.split_paths(str(root), data_name, split)
  os.makedirs(os.path.dirname(images_path), exist_ok=True)
  np.save(images_path, images)
  with open(captions_path, "wb") as f:
    f.write(raw if raw is not None else "".join(c + "\n" for c in captions).encode())
  return images_path, captions_path


def _numbered(n_images, regions=2, dim=3):
  """Row i filled with i; caption c is 'image <c // 5> caption <c % 5>'."""
  images = np.repeat(np.arange(n_images, dtype=np.float32), regions * dim)
  captions = [f"image {c // 5} caption {c % 5}" for c in range(5 * n_images)]
  return images.reshape(n_images, regions, dim), captions


def test_split_pairs_caption_c_with_image_c_div_5(tmp_path):
  images, captions = _numbered(4)
  _write_split(tmp_path, "f30k_precomp", "test", images, captions)
  split = scan.load_scan_split(str(tmp_path), "f30k_precomp", "test", VOCAB, max_len=8)
  assert isinstance(split, RetrievalSplit) and split.name == "f30k_precomp_test"
  assert split.images.shape == (4, 2, 3) and split.captions.shape == (20, 8)
  assert split.captions.dtype == np.int32 and split.lengths.dtype == np.int32
  for c in range(20):
    image = split.caption_image(c)
    assert split.caption_texts[c].startswith(f"image {image} ")
    assert float(split.images[image][0, 0]) == image
  np.testing.assert_array_equal(split.lengths, 6)  # <start> image N caption M <end>


def test_features_are_memory_mapped_and_rows_read_on_demand(tmp_path, monkeypatch):
  images, captions = _numbered(10)
  _write_split(tmp_path, "f30k_precomp", "train", images, captions)
  calls = []
  original_load = np.load

  def spy_load(*args, **kwargs):
    calls.append(kwargs.get("mmap_mode"))
    return original_load(*args, **kwargs)

  monkeypatch.setattr(np, "load", spy_load)
  split = scan.load_scan_split(str(tmp_path), "f30k_precomp", "train", VOCAB, max_len=8)
  assert calls == ["r"]
  assert isinstance(split.images, np.memmap) and split.images.mode == "r"
  rows = split.images[[7, 2]]
  assert not isinstance(rows, np.memmap) and rows.shape == (2, 2, 3)
  np.testing.assert_array_equal(rows[:, 0, 0], [7, 2])
  with pytest.raises(ValueError):
    split.images[0, 0, 0] = 1.0  # read-only


def _mapped_resident_bytes(path):
  """Resident bytes of this process's mappings of `path` (Linux /proc/self/smaps)."""
  total, inside = 0, False
  with open("/proc/self/smaps") as f:
    for line in f:
      fields = line.split()
      if "-" in fields[0] and len(fields) >= 5:
        inside = fields[-1] == os.path.realpath(path)
      elif inside and fields[0] == "Rss:":
        total += int(fields[1]) * 1024
  return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux smaps")
def test_20000_images_at_scan_size_load_without_reading_the_features(tmp_path):
  # 20,000 x 36 x 2048 float32 = 5.9 GB, as a sparse file: reading it all would show.
  n_images = 20000
  scan.write_fake_scan(str(tmp_path), "coco_precomp", {"train": n_images},
                       splits=("train",), sparse=True)
  images_path = scan.split_paths(str(tmp_path), "coco_precomp", "train")[0]
  split = scan.load_scan_split(str(tmp_path), "coco_precomp", "train", VOCAB, max_len=16)
  assert split.images.shape == (n_images, 36, 2048)
  assert split.captions.shape == (5 * n_images, 16)
  batch = split.images[np.array([5, 19999, 12345])]
  assert batch.shape == (3, 36, 2048) and not batch.any()
  # Only the finiteness sample and the batch were touched (plus the kernel's fault-around).
  resident = _mapped_resident_bytes(images_path)
  assert resident < 0.05 * os.path.getsize(images_path), resident


def test_dev_is_cut_to_1000_images(tmp_path):
  images, captions = _numbered(1003, regions=1, dim=1)
  _write_split(tmp_path, "f30k_precomp", "dev", images, captions)
  dev = scan.load_scan_split(str(tmp_path), "f30k_precomp", "dev", VOCAB, max_len=8)
  assert dev.num_images == 1000 and dev.num_captions == 5000
  assert len(dev.caption_texts) == 5000
  full = scan.load_scan_split(str(tmp_path), "f30k_precomp", "dev", VOCAB, max_len=8,
                              truncate_dev=False)
  assert full.num_images == 1003


def test_one_feature_row_per_caption_uses_every_fifth_row(tmp_path):
  images, captions = _numbered(3)
  _write_split(tmp_path, "f30k_precomp", "test", np.repeat(images, 5, axis=0), captions)
  split = scan.load_scan_split(str(tmp_path), "f30k_precomp", "test", VOCAB, max_len=8)
  assert split.images.shape == (3, 2, 3)
  np.testing.assert_array_equal(split.images[:, 0, 0], [0, 1, 2])


def test_domain_uses_testall_for_coco_and_test_otherwise(tmp_path):
  for data_name in ("coco_precomp", "f30k_precomp"):
    scan.write_fake_scan(str(tmp_path), data_name, 3, regions=2, dim=4)
  coco = scan.load_scan_domain(str(tmp_path), "coco_precomp", VOCAB, max_len=12)
  assert isinstance(coco, DomainData)
  assert coco.test.name == "coco_precomp_testall" and coco.dev.name == "coco_precomp_dev"
  f30k = scan.load_scan_domain(str(tmp_path), "f30k_precomp", VOCAB, 12, name="target",
                               with_dev=False)
  assert f30k.test.name == "target_test" and f30k.dev is None
  assert f30k.train.name == "target_train"
  coco_1k = scan.load_scan_domain(str(tmp_path), "coco_precomp", VOCAB, 12, test_split="test")
  assert coco_1k.test.name == "coco_precomp_test"


def test_domain_rejects_different_feature_shapes(tmp_path):
  scan.write_fake_scan(str(tmp_path), "f30k_precomp", 2, regions=2, dim=4,
                       splits=("train", "dev"))
  scan.write_fake_scan(str(tmp_path), "f30k_precomp", 2, regions=2, dim=5, splits=("test",))
  with pytest.raises(DataError, match="different feature shapes"):
    scan.load_scan_domain(str(tmp_path), "f30k_precomp", VOCAB, max_len=12)


def test_fake_captions_follow_their_image_topic(tmp_path):
  scan.write_fake_scan(str(tmp_path), "f30k_precomp", 6, regions=3, dim=32, seed=3,
                       splits=("train",))
  split = scan.load_scan_split(str(tmp_path), "f30k_precomp", "train", VOCAB, max_len=16)
  topics = []
  for i in range(6):
    nouns = [{w for w in caption.split() if w in scan._FAKE_WORDS}
             for caption in split.caption_texts[5 * i:5 * i + 5]]
    assert all(n == nouns[0] and len(n) == 1 for n in nouns)
    topics.append(nouns[0].pop())
  # Images of the same topic are closer to each other than to other topics.
  means = np.asarray(split.images).mean(axis=1)
  distances = ((means[:, None] - means[None]) ** 2).sum(-1)
  for i in range(6):
    nearest = np.argsort(distances[i])[1]
    same = [j for j in range(6) if j != i and topics[j] == topics[i]]
    if same:
      assert topics[nearest] == topics[i]


def _error(tmp_path, split="test", **kwargs):
  with pytest.raises(DataError) as error:
    scan.load_scan_split(str(tmp_path), "f30k_precomp", split, VOCAB, max_len=8, **kwargs)
  message = str(error.value)
  assert "\n" not in message
  return message


def test_missing_files_and_unknown_split(tmp_path):
  assert "test_ims.npy does not exist" in _error(tmp_path)
  images, captions = _numbered(2)
  images_path, captions_path = _write_split(tmp_path, "f30k_precomp", "test", images, captions)
  os.remove(captions_path)
  assert "test_caps.txt does not exist" in _error(tmp_path)
  assert "unknown SCAN split 'val'" in _error(tmp_path, split="val")


@pytest.mark.parametrize("array,expected", [
    (np.zeros((2, 6), np.float32), "expected float [images, regions, dim]"),
    (np.zeros((2, 2, 3), np.int32), "int32"),
    (np.zeros((0, 2, 3), np.float32), "is empty"),
])
def test_bad_feature_arrays(tmp_path, array, expected):
  _write_split(tmp_path, "f30k_precomp", "test", array, _numbered(2)[1])
  assert expected in _error(tmp_path)


def test_not_an_npy_file(tmp_path):
  images_path, _ = _write_split(tmp_path, "f30k_precomp", "test", *_numbered(2))
  with open(images_path, "wb") as f:
    f.write(b"not numpy")
  assert "not a readable .npy array" in _error(tmp_path)


def test_caption_count_must_be_five_per_image(tmp_path):
  images, captions = _numbered(3)
  _write_split(tmp_path, "f30k_precomp", "test", images, captions[:-1])
  assert "14 captions for 3 feature rows" in _error(tmp_path)


def test_empty_and_non_utf8_caption_lines_give_file_and_line(tmp_path):
  images, captions = _numbered(1)
  _, captions_path = _write_split(tmp_path, "f30k_precomp", "test", images, captions,
                                  raw=b"a\nb\n  \nd\ne\n")
  assert f"{captions_path}:3: empty caption line" in _error(tmp_path)
  _write_split(tmp_path, "f30k_precomp", "test", images, captions,
               raw=b"a\n\xff\xfe bad\nc\nd\ne")
  assert f"{captions_path}:2: caption is not valid UTF-8" in _error(tmp_path)


def test_crlf_and_missing_final_newline_are_accepted(tmp_path):
  images, captions = _numbered(1)
  _write_split(tmp_path, "f30k_precomp", "test", images, captions,
               raw=b"a dog\r\nb\r\nc\r\nd\r\ne")
  split = scan.load_scan_split(str(tmp_path), "f30k_precomp", "test", VOCAB, max_len=8)
  assert split.caption_texts == ["a dog", "b", "c", "d", "e"]


def test_non_finite_features(tmp_path):
  n = 200
  images, captions = _numbered(n, regions=1, dim=2)
  sampled = set(np.linspace(0, n - 1, scan.FINITE_CHECK_ROWS).astype(int))
  hidden = next(r for r in range(n) if r not in sampled)
  images[hidden, 0, 1] = np.nan
  images_path, _ = _write_split(tmp_path, "f30k_precomp", "test", images, captions)
  scan.load_scan_split(str(tmp_path), "f30k_precomp", "test", VOCAB, max_len=8)
  assert f"row {hidden} holds NaN or inf" in _error(tmp_path, check_all_finite=True)
  images[n - 1, 0, 0] = np.inf
  np.save(images_path, images)
  assert f"row {n - 1} holds NaN or inf" in _error(tmp_path)
