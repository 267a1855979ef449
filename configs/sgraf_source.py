"""Stage 0: SGRAF (SAF) trained on the source domain alone, the warm start of AECR.

The recipe of the SGRAF repository (docs/method.md 6.4) on the model of configs/aecr_reference.py:
batch 128, Adam 2e-4, margin 0.2 with hardest negatives, gradient clip 2 (over the encoders
only, as SGRAF has no discriminators), dropout 0.4; Flickr30K 30 epochs with the lr x0.1 after
epoch 20, MS-COCO 20 epochs with x0.1 after epoch 10. Both transfer weights are 0. The target
domain is still read: its train captions join the vocabulary (AECR's common vocabulary covers
both datasets; pass the same data.scan.vocab_path as the transfer run), and the trainer's
two-domain step gets a small target batch that no loss uses. Evaluated on the source test.

    python launch.py --config configs/sgraf_source.py:f30k2coco --workdir runs/sgraf_f30k2coco \
        --config.data.scan.root=DATA --config.data.scan.vocab_path=VOCAB.json
    # then: configs/aecr_reference.py:f30k2coco with --config.train.init_from=runs/sgraf_f30k2coco
    # the no-adaptation baseline (the stage-0 model on the target test):
    python -m aeir_jax.evaluate --config configs/aecr_reference.py:f30k2coco \
        --init_from runs/sgraf_f30k2coco --config.data.scan.root=DATA ...

The arg is a comma-separated list:
  scenario   f30k2coco (default: source Flickr30K) | coco2f30k (source MS-COCO); the
             scenario of the transfer run this model warm-starts
  clean      tokenise without the reference's bytes-repr bug (to warm-start
             configs/scan_transfer.py; the reference AECR runs keep the bug)
  smoke      tiny dims and a generated SCAN-format dataset
  seed=N, epochs=N
Deviation: SGRAF keeps the checkpoint with the best source dev rSum; `init_from` takes the
last one.
"""

from aeir_jax import config_lib
from aeir_jax.data import scan_transfer
from configs import aecr_reference

# Source dataset -> (epochs, lr decay after this many epochs), SGRAF's SAF recipe.
SCHEDULE = {"f30k_precomp": (30, 20), "coco_precomp": (20, 10)}
BATCH = 128
TARGET_BATCH = 8   # read but unused: both transfer weights are 0


def get_config(arg: str = ""):
  variants, kv = config_lib.parse_arg(arg, known_keys=("seed", "epochs"))
  scenario = aecr_reference.scenario_arg(variants, extra=("clean",))
  clean = "clean" in variants
  variants = [v for v in variants if v != "clean"]
  source = scan_transfer.SCENARIOS[scenario][0]
  default_epochs, decay_epochs = SCHEDULE[source]
  epochs = aecr_reference.epochs_arg(kv, default_epochs)

  config = aecr_reference.reference_config(scenario)
  config.variant = "sgraf_source"
  config.seed = int(kv.get("seed", 0))
  config.data.scan.tokenize_bytes_repr_bug = not clean
  config.data.source_batch = BATCH
  config.data.target_batch = TARGET_BATCH
  config.loss.adv_weight = 0.0
  config.loss.struct_weight = 0.0
  config.optim.lr = 2e-4
  config.optim.disc_lr = 2e-4
  config.optim.clip_scope = "per_group"
  epoch = scan_transfer.steps_per_epoch(scan_transfer.TRAIN_CAPTIONS[source], BATCH)
  config.optim.lr_decay_steps = decay_epochs * epoch
  config.train.num_steps = epochs * epoch
  config.train.eval_every = epoch
  config.eval.splits = ("source_test",)
  config_lib.apply_variants(config, variants)
  config.lock()
  return config
