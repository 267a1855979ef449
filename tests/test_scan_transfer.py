"""SCAN transfer data (`data.name='scan'`), protocol-named evaluation and block-wise scoring."""

import jax
import numpy as np
import pytest

from aeir_jax import config_lib, parallel, train
from aeir_jax.data import load_data, protocols
from aeir_jax.data.base import DomainData, RetrievalSplit, TransferData
from aeir_jax.data.scan import read_caption_lines, split_paths, write_fake_scan
from aeir_jax.data.vocab import UNK, Vocab
from aeir_jax.errors import ConfigError, DataError
from aeir_jax.evaluate import Evaluator
from configs import aecr_reference

SIZES = {"train": 12, "dev": 5, "test": 5, "testall": 10}


def scan_config(root, **scan_fields):
  """The smoke reference config reading real-layout files under `root`."""
  config = aecr_reference.get_config("smoke")
  with config.unlocked():
    config.data.scan.root = str(root)
    config.data.scan.fake.train_images = 0
    config.data.source_batch = config.data.target_batch = 8
    for key, value in scan_fields.items():
      config.data.scan[key] = value
  return config


@pytest.fixture(scope="module")
def scan_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("scan")
  write_fake_scan(str(root), "f30k_precomp", SIZES, regions=4, dim=8, seed=1)
  write_fake_scan(str(root), "coco_precomp", SIZES, regions=4, dim=8, seed=2)
  return root


def test_loads_source_and_target_memory_mapped(scan_root):
  config = scan_config(scan_root, tokenize_bytes_repr_bug=False)
  data = load_data(config)
  src, tgt = data.source, data.target
  assert src.test.name == "f30k_precomp_test" and tgt.test.name == "coco_precomp_testall"
  assert (src.test.num_images, tgt.test.num_images) == (5, 10)
  assert src.dev is not None and tgt.train.num_captions == 60
  for split in (src.train, tgt.train, tgt.test):
    assert isinstance(split.images, np.memmap) and split.images.shape[1:] == (4, 8)
    assert split.captions.shape == (5 * split.num_images, config.data.scan.max_len)
  train_captions = []
  for name in ("f30k_precomp", "coco_precomp"):
    train_captions += read_caption_lines(split_paths(str(scan_root), name, "train")[1])
  assert data.words == Vocab.build(train_captions, 4).words
  assert data.vocab_size == len(data.words) and data.image_dim == 8
  assert (tgt.train.captions[:, 1] != UNK).all()


def test_bytes_repr_bug_and_vocab_file(scan_root, tmp_path):
  plain = load_data(scan_config(scan_root, tokenize_bytes_repr_bug=False))
  buggy = load_data(scan_config(scan_root, tokenize_bytes_repr_bug=True))
  assert buggy.words == plain.words  # the vocabulary comes from the decoded text
  assert (buggy.source.train.captions[:, 1] == UNK).all()  # "b'a" is no word
  np.testing.assert_array_equal(buggy.source.train.lengths, plain.source.train.lengths + 1)
  path = tmp_path / "vocab.json"
  Vocab(plain.words).save(str(path))
  from_file = load_data(scan_config(scan_root, vocab_path=str(path)))
  assert from_file.words == plain.words
  np.testing.assert_array_equal(from_file.target.test.captions, buggy.target.test.captions)


def test_missing_data_errors(scan_root, tmp_path):
  with pytest.raises(ConfigError, match="data.scan.root is empty"):
    load_data(scan_config(""))
  with pytest.raises(DataError, match=r"has no folder f30k_precomp/; expected .*_ims\.npy"):
    load_data(scan_config(tmp_path))
  write_fake_scan(str(tmp_path), "f30k_precomp", SIZES, regions=4, dim=8)
  write_fake_scan(str(tmp_path), "coco_precomp", SIZES, regions=4, dim=8,
                  splits=("train", "dev", "test"))
  with pytest.raises(DataError, match="testall_ims.npy does not exist"):
    load_data(scan_config(tmp_path))
  write_fake_scan(str(tmp_path), "coco_precomp", SIZES, regions=4, dim=6)
  with pytest.raises(DataError, match="both must come from one feature extractor"):
    load_data(scan_config(tmp_path))
  with pytest.raises(ConfigError, match="target_test_split"):
    load_data(scan_config(scan_root, target_test_split="val"))


def test_generated_dataset_is_cached():
  config = aecr_reference.get_config("coco2f30k,smoke")
  first, second = load_data(config), load_data(config)
  assert first.source.train.images.filename == second.source.train.images.filename
  assert first.source.test.name == "coco_precomp_testall"
  assert first.target.train.num_images == config.data.scan.fake.train_images


def test_protocol_config_is_checked(scan_root):
  config = scan_config(scan_root)
  with config.unlocked():
    config.eval.protocols.target_test = ("coco_1k",)
  with pytest.raises(ConfigError, match="unknown protocol"):
    config_lib.validate(config)
  config = scan_config(scan_root, target_test_split="test")  # 5 images: folds of 1
  config_lib.validate_with_data(config, load_data(config))
  config = scan_config(scan_root, target_test_split="dev", with_dev=False)
  with config.unlocked():
    config.eval.protocols.target_test = ("coco_5fold1k",)
  write_fake_scan(str(scan_root), "coco_precomp", {"dev": 7}, regions=4, dim=8, seed=2,
                  splits=("dev",))
  with pytest.raises(ConfigError, match="not a multiple of 5"):
    config_lib.validate_with_data(config, load_data(config))


@pytest.mark.parametrize("similarity", ["cosine", "saf"])
def test_blockwise_scores_and_protocol_keys(similarity, one_device):
  config = aecr_reference.get_config("smoke")
  with config.unlocked():
    config.model.similarity = similarity
  rng = np.random.default_rng(0)
  n_img, length, vocab = 10, 7, 20
  lengths = rng.integers(3, length + 1, 5 * n_img).astype(np.int32)
  captions = rng.integers(4, vocab, (5 * n_img, length)).astype(np.int32)
  captions[np.arange(length)[None, :] >= lengths[:, None]] = 0
  split = RetrievalSplit(images=rng.standard_normal((n_img, 6, 12)).astype(np.float32),
                         captions=captions, lengths=lengths)
  data = TransferData(source=DomainData(train=split, test=split),
                      target=DomainData(train=split, test=split), vocab_size=vocab, image_dim=12)
  model, _ = train.build_models(config, data)
  variables = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                         split.images[:2], captions[:2], lengths[:2])
  mesh = parallel.make_mesh(one_device)
  evaluator = Evaluator(model, 8, parallel.data_sharding(mesh), parallel.replicated(mesh))

  full = np.asarray(jax.jit(model.apply)(variables, split.images, captions, lengths))
  metrics, sims = evaluator.evaluate(variables, split, "target_test", return_scores=True,
                                     protocols=("coco_5fold1k", "coco_5k"))
  np.testing.assert_allclose(sims, full, atol=1e-5)
  expected = {**protocols.protocol_metrics(sims, "fold5", "coco_5fold1k"),
              **protocols.protocol_metrics(sims, "full", "coco_5k")}
  assert metrics == pytest.approx(expected)
  plain = evaluator.evaluate(variables, split, "target_test")
  assert plain == pytest.approx(protocols.protocol_metrics(sims, "full", "target_test"))
