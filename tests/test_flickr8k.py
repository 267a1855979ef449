"""Flickr8k people -> animals: split/domain counts, row order, no target pairing in training,
the feature variants, the text encoders and the smoke config end to end."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aeir_jax import config_lib, train
from aeir_jax.data import flickr8k, load_data
from aeir_jax.data.samplers import PairedSampler, UnpairedSampler
from aeir_jax.data.tokenizer import tokenize
from aeir_jax.errors import ConfigError, DataError
from aeir_jax.models.aeir import AEIRModel
from configs import flickr8k_transfer
from tests.conftest import shared_path

# README table: images per (split, domain); captions are 5 per image.
README_IMAGES = {"source_train": 4289, "source_test": 742, "target_train": 1641,
                 "target_dev": 259, "target_test": 253}


def make_config(arg="", **fields):
  """The Flickr8k config with its data root set to the shared folder (or a skip)."""
  config = flickr8k_transfer.get_config(arg)
  fields = {"data.flickr8k.root": str(shared_path("data", "flickr8k")), **fields}
  return config_lib.override(config, fields)


def load(config):
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*skipped 1 line")
    return load_data(config)


@pytest.fixture(scope="module")
def data():
  return load(make_config())


def parts(data):
  return {"source_train": data.source.train, "source_test": data.source.test,
          "target_train": data.target.train, "target_dev": data.target.dev,
          "target_test": data.target.test}


def test_counts_match_readme(data):
  for name, split in parts(data).items():
    assert split.name == name
    assert (split.num_images, split.num_captions) == (README_IMAGES[name],
                                                      5 * README_IMAGES[name]), name
    assert len(split.image_ids) == split.num_images
    assert len(split.caption_texts) == split.num_captions
  assert data.image_dim == 1280 and data.caption_dim == 384 and data.vocab_size == 0
  assert data.target.test.images.shape == (253, 4, 1280)
  assert data.target.test.captions.shape == (1265, 1, 384)


def test_stray_caption_line_is_reported():
  with pytest.warns(UserWarning, match="skipped 1 line.*6731"):
    load_data(make_config("smoke"))


def test_domains_and_splits_are_disjoint(data):
  root = shared_path("data", "flickr8k")
  rows = [line.split("\t") for line in (root / "domain_split.tsv").read_text().splitlines()[1:]]
  table = {r[0]: (r[1], r[2]) for r in rows}
  want = {"source_train": ("train", "people_scene"), "source_test": ("test", "people_scene"),
          "target_train": ("train", "animal"), "target_dev": ("dev", "animal"),
          "target_test": ("test", "animal")}
  seen = set()
  for name, split in parts(data).items():
    ids = set(split.image_ids)
    assert {table[i] for i in ids} == {want[name]}, name
    assert not ids & seen, name
    seen |= ids


def test_rows_follow_the_order_files(data):
  root = shared_path("data", "flickr8k")
  names = (root / "f8k_image_names.txt").read_text().split()
  keys = (root / "f8k_caption_keys.txt").read_text().split()
  grid = np.load(root / "f8k_effnetlite0_grid2x2_fp16.npy", mmap_mode="r")
  emb = np.load(root / "f8k_minilm_caption_emb_fp16.npy", mmap_mode="r")
  split = data.target.test
  picks = np.array([5, 0, 200, 5])
  np.testing.assert_array_equal(
      split.images[picks], grid[[names.index(split.image_ids[i]) for i in picks]])
  captions = np.array([1, 1264, 17])
  want = [keys.index(f"{split.image_ids[c // 5]}#{c % 5}") for c in captions]
  np.testing.assert_array_equal(split.captions[captions][:, 0], emb[want])
  token_lines = dict(line.split("\t") for line in
                     (root / "Flickr8k.token.txt").read_text().splitlines())
  assert split.caption_texts[17] == token_lines[f"{split.image_ids[3]}#2"].strip()


def test_target_pairing_never_reaches_the_train_sampler(data):
  split = data.target.train
  sampler = UnpairedSampler(split, 128, seed=0)
  same = total = 0
  images_seen = set()
  for step in range(sampler.steps_per_epoch):
    img, cap = sampler.indices(step)
    same += int(np.sum(split.caption_image(cap) == img))
    total += len(cap)
    images_seen.update(img.tolist())
  # Chance level is 1 / 1641 per pair; a leak of the pairing would give ~1.
  assert same / total < 0.01
  assert len(images_seen) > 0.95 * split.num_images
  src_img, src_cap = PairedSampler(data.source.train, 128, seed=0).indices(3)
  np.testing.assert_array_equal(data.source.train.caption_image(src_cap), src_img)


def test_tokens_vocabulary_comes_from_train_captions_only():
  d = load(make_config("features=tokens"))
  assert d.caption_dim == 0 and d.vocab_size == len(d.words)
  train_words = {}
  for split in (d.source.train, d.target.train):
    for caption in split.caption_texts:
      for word in tokenize(caption):
        train_words[word] = train_words.get(word, 0) + 1
  assert set(d.words[4:]) == {w for w, n in train_words.items() if n >= 4}
  test_only = {w for c in d.target.test.caption_texts for w in tokenize(c)} - set(train_words)
  assert test_only and not test_only & set(d.words)
  assert d.target.test.captions.shape == (1265, 40) and d.target.test.captions.dtype == np.int32


def test_extracted_features(tmp_path, data):
  names = sorted({n for s in parts(data).values() for n in s.image_ids[:3]})
  keys = [f"{n}#{i}" for n in names for i in range(5)]
  rng = np.random.default_rng(0)
  images = rng.standard_normal((len(names), 1280)).astype(np.float16)
  fragments = rng.standard_normal((len(keys), 6, 384)).astype(np.float16)
  lengths = rng.integers(1, 7, len(keys)).astype(np.int32)
  np.save(tmp_path / "pooled.npy", images)
  np.save(tmp_path / "tok.npy", fragments)
  np.save(tmp_path / "tok.lengths.npy", lengths)
  (tmp_path / "pooled.order.txt").write_text("".join(n + "\n" for n in names[::-1]))
  (tmp_path / "tok.order.txt").write_text("".join(k + "\n" for k in keys))
  d = load(make_config("features=extracted", **{
      "data.flickr8k.features_dir": str(tmp_path), "data.flickr8k.subset": 3,
      "data.flickr8k.image_features": "pooled.npy", "data.flickr8k.caption_features": "tok.npy"}))
  split = d.target.dev
  assert split.images.shape == (3, 1, 1280) and split.captions.shape == (15, 6, 384)
  row = names[::-1].index(split.image_ids[2])
  np.testing.assert_array_equal(split.images[2][0], images[row].astype(np.float32))
  key_rows = [keys.index(f"{split.image_ids[c // 5]}#{c % 5}") for c in range(15)]
  np.testing.assert_array_equal(split.lengths, lengths[key_rows])
  np.testing.assert_array_equal(split.captions[[14, 0]], fragments[[key_rows[14], key_rows[0]]])
  with pytest.raises(ConfigError, match="features_dir"):
    load(make_config("features=extracted"))


def test_bad_inputs_name_the_field(tmp_path):
  with pytest.raises(DataError, match="data.flickr8k.root"):
    load(make_config(**{"data.flickr8k.root": str(tmp_path / "nowhere")}))
  with pytest.raises(ConfigError, match="target_domain='cats'.*animal"):
    load(make_config(**{"data.flickr8k.target_domain": "cats"}))
  with pytest.raises(ConfigError, match="features='video'"):
    flickr8k_transfer.get_config("features=video")
  config = make_config("smoke", **{"model.text_encoder": "gru"})
  with pytest.raises(ConfigError, match="text_encoder=features"):
    config_lib.validate_with_data(config, load(config))
  with pytest.raises(ConfigError, match="text_frozen"):
    config_lib.validate(make_config(**{"model.text_frozen": True}))


def test_features_text_encoder(data):
  config = make_config("smoke")
  model = AEIRModel(config.model, vocab_size=0, caption_dim=data.caption_dim)
  split = data.target.test
  caps, lengths = split.captions[np.arange(6)], split.lengths[:6]
  variables = model.init(jax.random.PRNGKey(0), split.images[np.arange(2)], caps, lengths)
  assert set(variables["params"]["text_encoder"]) == {"fc"}
  frags, mask = model.apply(variables, caps, lengths, method=model.encode_captions)
  assert frags.shape == (6, 1, config.model.embed_dim) and bool(mask.all())
  np.testing.assert_allclose(jnp.linalg.norm(frags, axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="caption_dim"):
    AEIRModel(config.model, vocab_size=10, caption_dim=0).init(
        jax.random.PRNGKey(0), split.images[np.arange(2)], np.ones((2, 3), np.int32),
        np.array([3, 2]))


def test_minilm_text_encoder_starts_pretrained_and_freezes():
  from aeir_jax.models.minilm import load_minilm
  try:
    tokenize_wp, module, pretrained = load_minilm()
  except DataError as e:
    pytest.skip(str(e))
  ids, mask = tokenize_wp(["a dog runs on the grass .", "two girls sit ."])
  lengths = mask.sum(1)
  config = make_config("smoke", **{"model.text_encoder": "minilm", "model.text_frozen": True})
  model = AEIRModel(config.model, vocab_size=30522)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((2, 4, 8), np.float32), ids, lengths)
  bert = variables["params"]["text_encoder"]["bert"]
  jax.tree.map(np.testing.assert_array_equal, bert, pretrained["params"])

  def loss(params):
    frags, m = model.apply({"params": params}, ids, lengths, train=True,
                           rngs={"dropout": jax.random.PRNGKey(1)}, method=model.encode_captions)
    return jnp.sum(frags[:, :, 0] * m)

  grads = jax.grad(loss)(variables["params"])["text_encoder"]
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["bert"]))
  assert float(jnp.abs(grads["fc"]["kernel"]).max()) > 0
  frags, m = model.apply(variables, ids, lengths, method=model.encode_captions)
  np.testing.assert_array_equal(m, mask.astype(bool))
  np.testing.assert_allclose(jnp.linalg.norm(frags, axis=-1), mask, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*skipped 1 line")
def test_smoke_config_runs_end_to_end(tmp_path, one_device):
  config = make_config("smoke")
  assert config.data.flickr8k.features == "precomputed"
  results = train.run(config, str(tmp_path), devices=one_device)
  assert results["step"] == config.train.num_steps
  for key in ("target_dev/rsum", "source_test/i2t_r1"):
    assert key in results
  assert "target_test/rsum" not in results
  examples = json.loads((tmp_path / "retrieval" / "target_dev.json").read_text())
  assert json.dumps(examples).count(".jpg") > 0


def test_sweep_reports_on_target_test():
  points = flickr8k_transfer.sweep()
  args = sorted(p["arg"] for p in points)
  assert len(points) == 15 and all("eval=test" in a for a in args)
  assert {a.split(",")[0] for a in args} == {"aeir", "semantic_only", "structural_only",
                                             "source_only", "oracle"}
  config = flickr8k_transfer.get_config("oracle,seed=2,eval=test")
  assert config.data.oracle and config.seed == 2 and "target_test" in config.eval.splits
