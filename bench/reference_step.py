"""Benchmark (not a test): one train step of the AECR reference config and 1K x 5K SAF scoring.

    python bench/reference_step.py [--repeats 5] [--length 32] [--score_images 100]

Full sizes of configs/aecr_reference.py: 36 regions of 2048-d features, embed 1024, words 300,
SAF head 256, vocabulary 12,872, batch 56 source + 56 target, captions of `--length` ids (true
lengths drawn from [length / 2, length]); random inputs, default device.

Prints medians over `--repeats` runs after compilation (compile times separately):
  * one jitted train step (all three losses, both Adam updates);
  * scoring 1,000 images x 5,000 captions through the `Evaluator` (encode + SAF head in blocks
    of `eval.batch_size` = 100). The Evaluator runs on `--score_images` images and their
    5 x `--score_images` captions; encoding is extrapolated linearly in the number of images
    and captions, the SAF blocks in the number of image-caption pairs. With
    `--score_images 1000` nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aeir_jax import parallel, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from aeir_jax.data.base import DomainData, RetrievalSplit, TransferData  # pylint: disable=g-import-not-at-top,wrong-import-position
from aeir_jax.evaluate import Evaluator  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import aecr_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

VOCAB = 12_872
REGIONS, IMAGE_DIM = 36, 2048
FULL_IMAGES = 1000


def random_split(rng, n_images: int, length: int) -> RetrievalSplit:
  """`n_images` random images `[N, 36, 2048]` with 5 random captions each `[5N, length]`."""
  n_captions = 5 * n_images
  lengths = rng.integers(length // 2, length + 1, n_captions).astype(np.int32)
  captions = rng.integers(4, VOCAB, (n_captions, length)).astype(np.int32)
  captions[np.arange(length)[None, :] >= lengths[:, None]] = 0
  images = rng.standard_normal((n_images, REGIONS, IMAGE_DIM), dtype=np.float32)
  return RetrievalSplit(images=images, captions=captions, lengths=lengths)


def timed(fn, repeats: int):
  """(first call seconds, median of `repeats` further calls); fn must block until done."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--length", type=int, default=32, help="caption width L in ids")
  parser.add_argument("--score_images", type=int, default=100,
                      help="images scored (with 5x captions); extrapolated to 1,000")
  args = parser.parse_args(argv)

  config = aecr_reference.get_config("f30k2coco")
  rng = np.random.default_rng(0)
  batch = config.data.source_batch
  split = random_split(rng, batch, args.length)
  data = TransferData(source=DomainData(train=split, test=split),
                      target=DomainData(train=split, test=split), vocab_size=VOCAB,
                      image_dim=IMAGE_DIM)
  model, discs = train.build_models(config, data)
  txs = train.build_optimizers(config)
  state = jax.jit(lambda key: train.init_state(config, model, discs, txs, data, key))(
      jax.random.PRNGKey(0))
  take = lambda s: {"images": s.images, "captions": s.captions[::5], "lengths": s.lengths[::5]}
  host_batch = {"source": take(split), "target": take(random_split(rng, batch, args.length))}
  device_batch = jax.device_put(host_batch)
  step = jax.jit(train.make_train_step(config, model, discs, txs), donate_argnums=0)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], device_batch)
    jax.block_until_ready(metrics)

  print(f"device: {jax.devices()[0].device_kind} ({jax.device_count()} device(s), "
        f"{os.cpu_count()} CPUs)")
  compile_s, step_s = timed(one_step, args.repeats)
  print(f"train step (batch {batch}+{batch}, L={args.length}): {step_s * 1e3:.0f} ms median of "
        f"{args.repeats}; first call incl. compile {compile_s:.1f} s; "
        f"{2 * batch / step_s:.0f} pairs/s")

  mesh = parallel.make_mesh(jax.devices()[:1])
  evaluator = Evaluator(model, config.eval.batch_size, parallel.data_sharding(mesh),
                        parallel.replicated(mesh))
  variables = {"params": holder["state"]["params"]["enc"], **holder["state"]["model_state"]}
  part = random_split(rng, args.score_images, args.length)
  first, total = timed(lambda: evaluator.scores(variables, part), args.repeats)
  _, encode = timed(lambda: evaluator.encode(variables, part), args.repeats)
  factor = FULL_IMAGES / args.score_images
  full = encode * factor + max(total - encode, 0.0) * factor ** 2
  pairs = args.score_images * 5 * args.score_images
  print(f"scoring {args.score_images} x {5 * args.score_images} (eval batch "
        f"{config.eval.batch_size}): {total:.2f} s median of {args.repeats} (encode "
        f"{encode:.2f} s, SAF {max(total - encode, 0.0):.2f} s = "
        f"{pairs / max(total - encode, 1e-9):.0f} pairs/s); first call incl. compile "
        f"{first:.1f} s")
  what = "measured" if factor == 1 else f"extrapolated from {100 / factor ** 2:.1f}% of the pairs"
  print(f"scoring 1000 x 5000: {full:.1f} s ({what})")


if __name__ == "__main__":
  main()
