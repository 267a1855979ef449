"""Retrieval evaluation: encode a split in batches, score all pairs, rank.

Images and captions are encoded in fixed-size jitted batches (the last one padded, so one
compilation serves every batch). The score matrix `[N_images, N_captions]` is assembled on
the host in fp32 block by block (a 5,000 x 25,000 evaluation is 500 MB of host memory, never
a device buffer of that size), then ranked by `aeir_jax.data.protocols` (SCAN/VSE++ protocol:
i2t ranks the best of an image's 5 captions), over the whole matrix or by named protocols
(`f30k_1k`, `coco_5k`, `coco_5fold1k`).

Eval-only entry point (e.g. a stage-0 source model on the target, without adaptation):

    python -m aeir_jax.evaluate --config configs/aecr_reference.py:f30k2coco \
        --init_from runs/sgraf_f30k [--workdir runs/no_adaptation_f30k2coco]
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from aeir_jax.data.base import RetrievalSplit
from aeir_jax.data.protocols import STANDARD, protocol_metrics
from aeir_jax.errors import ConfigError, UserError, WorkdirError
from aeir_jax.models.similarity import pooled_caption, pooled_image


def _padded_batches(n, batch):
  for start in range(0, n, batch):
    idx = np.arange(start, min(start + batch, n))
    yield idx, np.pad(idx, (0, batch - len(idx)), mode="edge")


class Evaluator:
  """Scores retrieval splits with the current params; jitted functions are built once."""

  def __init__(self, model, batch_size: int, data_sharding, replicated):
    self.model = model
    # Blocks split evenly over the devices: round the batch up to a multiple of their count.
    n_dev = data_sharding.mesh.devices.size
    self.batch_size = -(-batch_size // n_dev) * n_dev
    self.data_sharding = data_sharding
    self.replicated = replicated
    # A dual-encoder head scores pooled embeddings: one matmul per block.
    self.dual = model.model_config.similarity == "cosine"

    def enc_img(variables, regions):
      frags = model.apply(variables, regions, method=model.encode_images)
      return pooled_image(frags) if self.dual else frags

    def enc_cap(variables, captions, lengths):
      frags, mask = model.apply(variables, captions, lengths, train=False,
                                method=model.encode_captions)
      return pooled_caption(frags, mask) if self.dual else (frags, mask)

    def score(variables, img, cap, mask):
      # Each device scores its share of the caption block (pairs are independent in eval
      # mode); the replicated output gathers the columns.
      cap = jax.lax.with_sharding_constraint(cap, data_sharding)
      mask = jax.lax.with_sharding_constraint(mask, data_sharding)
      return model.apply(variables, img, cap, mask, train=False, method=model.score)

    def dot(img, cap):
      cap = jax.lax.with_sharding_constraint(cap, data_sharding)
      return jnp.dot(img, cap.T, precision="highest")

    self._enc_img = jax.jit(enc_img, out_shardings=replicated)
    self._enc_cap = jax.jit(enc_cap, out_shardings=replicated)
    self._score = jax.jit(score, out_shardings=replicated)
    self._dot = jax.jit(dot, out_shardings=replicated)

  def _put(self, x):
    return jax.device_put(x, self.replicated)

  def encode(self, variables, split: RetrievalSplit):
    """Returns host arrays: image and caption embeddings (pooled, or fragments + mask)."""
    imgs, caps = [], []
    for idx, padded in _padded_batches(split.num_images, self.batch_size):
      out = self._enc_img(variables, self._put(np.asarray(split.images[padded], np.float32)))
      imgs.append(jax.tree.map(lambda x, n=len(idx): np.asarray(x)[:n], out))
    for idx, padded in _padded_batches(split.num_captions, self.batch_size):
      out = self._enc_cap(variables, self._put(np.asarray(split.captions[padded])),
                          self._put(np.asarray(split.lengths[padded], np.int32)))
      caps.append(jax.tree.map(lambda x, n=len(idx): np.asarray(x)[:n], out))
    cat = lambda parts: jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    return cat(imgs), cat(caps)

  def scores(self, variables, split: RetrievalSplit) -> np.ndarray:
    """All-pairs scores `[N_images, N_captions]` float32 on the host.

    The images are encoded once and stay on the device; captions are encoded one batch at a
    time and scored against every image batch, and each `[N_images, batch]` column of scores
    is fetched at once. So the caption fragments of a whole split (5 GB for COCO's 25,000
    captions at L = 50, E = 1024) never exist at once, on the host or on the device.
    """
    n_img, n_cap = split.num_images, split.num_captions
    images = [self._enc_img(variables, self._put(np.asarray(split.images[padded], np.float32)))
              for _, padded in _padded_batches(n_img, self.batch_size)]
    out = np.empty((n_img, n_cap), np.float32)
    for c_idx, c_pad in _padded_batches(n_cap, self.batch_size):
      cap = self._enc_cap(variables, self._put(np.asarray(split.captions[c_pad])),
                          self._put(np.asarray(split.lengths[c_pad], np.int32)))
      if self.dual:
        column = [self._dot(img, cap) for img in images]
      else:
        column = [self._score(variables, img, cap[0], cap[1]) for img in images]
      out[:, c_idx[0]:c_idx[-1] + 1] = np.asarray(jnp.concatenate(column))[:n_img, :len(c_idx)]
    return out

  def evaluate(self, variables, split: RetrievalSplit, prefix: str, return_scores=False,
               protocols=()):
    """Metrics of the split's score matrix; with `return_scores` also the matrix.

    Without `protocols` the keys are `{prefix}/{metric}` over the whole matrix; with
    `protocols` (names of `aeir_jax.data.protocols.STANDARD`, e.g. `("coco_5fold1k",
    "coco_5k")`) they are `{protocol}/{metric}` for each, e.g. `coco_5fold1k/rsum`.
    """
    sims = self.scores(variables, split)
    named = {name: STANDARD[name] for name in protocols} or {prefix: "full"}
    metrics = {}
    for name, protocol in named.items():
      metrics.update(protocol_metrics(sims, protocol, name, split.captions_per_image))
    metrics = {k: float(v) for k, v in metrics.items()}
    return (metrics, sims) if return_scores else metrics


def _subset(split: RetrievalSplit, num_images: int) -> RetrievalSplit:
  n = min(num_images, split.num_images)
  cpi = split.captions_per_image
  return RetrievalSplit(images=split.images[:n], captions=split.captions[:n * cpi],
                        lengths=split.lengths[:n * cpi], captions_per_image=cpi, name=split.name)


def pooled_embeddings(evaluator: Evaluator, variables, split: RetrievalSplit, num_images: int):
  """Pooled, l2-normalised embeddings of the first images and their captions (for plots)."""
  img, cap = evaluator.encode(variables, _subset(split, num_images))
  if evaluator.dual:
    return img, cap
  return (np.asarray(pooled_image(img)), np.asarray(pooled_caption(cap[0], cap[1])))


def retrieval_examples(sims: np.ndarray, split: RetrievalSplit, num_queries=8, top=5) -> dict:
  """Top-`top` results for the first text and image queries, with the correct ones marked."""
  cpi = split.captions_per_image
  image_ids = split.image_ids or [str(i) for i in range(split.num_images)]
  texts = split.caption_texts or [f"caption {c}" for c in range(split.num_captions)]
  t2i, i2t = [], []
  for c in range(0, min(num_queries * cpi, split.num_captions), cpi):
    order = np.argsort(-sims[:, c], kind="stable")[:top]
    t2i.append({"caption_index": c, "caption": texts[c],
                "results": [{"image_index": int(i), "image_id": image_ids[i],
                             "correct": bool(i == c // cpi)} for i in order]})
  for i in range(min(num_queries, split.num_images)):
    order = np.argsort(-sims[i], kind="stable")[:top]
    i2t.append({"image_index": i, "image_id": image_ids[i],
                "results": [{"caption_index": int(c), "caption": texts[c],
                             "correct": bool(c // cpi == i)} for c in order]})
  return {"split": split.name, "text_to_image": t2i, "image_to_text": i2t}


def evaluate_checkpoint(config, init_from: str = "", workdir: str = "", devices=None) -> dict:
  """Scores the config's evaluation splits with saved encoder params, without training.

  For baselines such as a stage-0 source model on the target test protocols without any
  adaptation. Prints the same results table as a training run.

  Args:
    config: a run config (data, model and `eval.*` are read; nothing is trained).
    init_from: a params checkpoint (`checkpoints.save_params`, `tools.import_torch`) or a
      finished workdir; default `config.train.init_from`.
    workdir: if set, `config.json` and `results.json` are written there.
    devices: the mesh's devices (default all).

  Returns:
    `{'step': 0, 'variant': 'no_adaptation', 'seed', 'init_from', <metric keys>}`.
  """
  # Imported here: train imports this module.
  from aeir_jax import artifacts, checkpoints, config_lib, parallel  # pylint: disable=g-import-not-at-top
  from aeir_jax.data import load_data  # pylint: disable=g-import-not-at-top
  from aeir_jax.logging_lib import format_results_table  # pylint: disable=g-import-not-at-top
  from aeir_jax.train import build_models  # pylint: disable=g-import-not-at-top
  init_from = init_from or config.train.init_from
  if not init_from:
    raise ConfigError("nothing to evaluate: pass --init_from (a params checkpoint or a "
                      "finished workdir) or set --config.train.init_from")
  config_lib.validate(config)
  data = load_data(config)
  config_lib.validate_with_data(config, data)
  model, _ = build_models(config, data)
  split = data.source.train
  dummy = (np.zeros((2,) + split.images.shape[1:], np.float32),
           np.zeros((2,) + split.captions.shape[1:], split.captions.dtype),
           np.full((2,), 2, np.int32))
  key = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, *dummy))
  loaded = checkpoints.load_params(init_from)
  for collection, target in abstract.items():
    if collection not in loaded or not checkpoints.tree_shapes_match(loaded[collection], target):
      raise WorkdirError(f"init_from {init_from}: its {collection} are missing or have other "
                         "shapes than this config's model; check model dims, similarity head "
                         "and vocabulary size")
  mesh = parallel.make_mesh(devices)
  repl = parallel.replicated(mesh)
  variables = jax.device_put({k: loaded[k] for k in abstract}, repl)
  evaluator = Evaluator(model, config.eval.batch_size, parallel.data_sharding(mesh), repl)
  splits = config_lib.eval_splits(config, data)
  results = {"step": 0, "variant": "no_adaptation", "seed": config.seed,
             "init_from": os.path.abspath(init_from)}
  for name, eval_split in splits.items():
    results.update(evaluator.evaluate(variables, eval_split, name,
                                      protocols=config.eval.protocols[name]))
  if jax.process_index() == 0:
    if workdir:
      artifacts.write_json(workdir, "config.json", json.loads(config.to_json()))
      artifacts.write_json(workdir, "results.json", results)
    print(format_results_table(results, config_lib.result_prefixes(config, splits)), flush=True)
  return results


def main(argv) -> int:
  """`python -m aeir_jax.evaluate --config FILE[:arg] [--init_from DIR] [--workdir DIR]`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fl = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.",
                                  flag_values=fl, lock_config=True)
  flags.DEFINE_string("init_from", "", "Params checkpoint or finished workdir to evaluate "
                      "(default: the config's train.init_from).", flag_values=fl)
  flags.DEFINE_string("workdir", "", "Optional directory for config.json and results.json.",
                      flag_values=fl)
  try:
    try:
      fl(argv)
    except flags.Error as e:
      raise ConfigError(" ".join(str(e).split())) from None
    if fl["config"].value is None:
      raise ConfigError("--config is required, e.g. --config configs/aecr_reference.py")
    evaluate_checkpoint(fl.config, fl.init_from, fl.workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
