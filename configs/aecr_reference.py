"""AECR as the reference code runs it: SGRAF (SAF) encoders + semantic and structural transfer.

Every value is the reference's default (docs/method.md 6.3 and appendix B), and every quirk switch
of docs/reference.md is set to the reference's behaviour (configs/scan_transfer.py has the
clean ones). Warm start from a stage-0 source model (configs/sgraf_source.py) or an imported
SGRAF checkpoint (`python -m aeir_jax.tools.import_torch SGRAF_f30k_model_best.pth.tar OUT`):

    python launch.py --config configs/aecr_reference.py:f30k2coco --workdir runs/aecr_f30k2coco \
        --config.data.scan.root=DATA --config.data.scan.vocab_path=VOCAB.json \
        --config.train.init_from=runs/sgraf_f30k2coco
    python launch.py --config configs/aecr_reference.py:smoke --workdir /tmp/aecr_smoke

The arg is a comma-separated list:
  scenario   f30k2coco (default: Flickr30K -> MS-COCO) | coco2f30k
  variant    aeir (default) | source_only (fine-tune on the source only, a baseline) |
             semantic_only | structural_only | oracle (target pairs, an upper bound)
  smoke      tiny dims and a generated SCAN-format dataset (no real data needed)
  seed=N     the training seed; epochs=N  the number of epochs (default 3)
One epoch is one pass over the target's train captions (566,435 COCO / 145,000 F30K, batches
of 56, the last partial batch counted as in the reference): 10,115 / 2,590 steps.
"""

from aeir_jax import config_lib
from aeir_jax import sweep as sweep_lib
from aeir_jax.data import scan_transfer
from aeir_jax.errors import ConfigError

EPOCHS = 3
# The quirk switches whose reference value differs from the clean one (docs/reference.md):
# field -> clean value. configs/scan_transfer.py applies all of them.
CLEAN_SWITCHES = {
    "loss.disc_grad_mode": "clean",
    "optim.clip_scope": "per_group",
    "loss.disc_pool_caption": "masked_mean",
    "loss.pad_zero_candidate": False,
    "data.scan.tokenize_bytes_repr_bug": False,
}
LR_DECAY_EPOCHS = 20
BATCH = 56
SEEDS = (0, 1, 2)


def scenario_arg(variants, extra=()):
  """Takes the scenario name out of the arg's variants (default f30k2coco); `extra` are the
  config's own variant names."""
  known = (*scan_transfer.SCENARIOS, *config_lib.TRANSFER_VARIANTS, "smoke", *extra)
  unknown = [v for v in variants if v not in known]
  if unknown:
    raise ConfigError(f"unknown config variant(s) {unknown}; known: {', '.join(known)}")
  scenarios = [v for v in variants if v in scan_transfer.SCENARIOS]
  if len(scenarios) > 1:
    raise ConfigError(f"config arg names several scenarios {scenarios}; pick one of "
                      f"{', '.join(scan_transfer.SCENARIOS)}")
  for name in scenarios:
    variants.remove(name)
  return scenarios[0] if scenarios else "f30k2coco"


def reference_config(scenario: str, epochs: int = EPOCHS):
  """The reference AECR config of a scenario (unlocked, no variants applied)."""
  source, target = scan_transfer.SCENARIOS[scenario]
  c = config_lib.base_config()
  c.scenario = scenario

  c.data.name = "scan"
  c.data.scan = scan_transfer.scan_data_config(source, target)
  c.data.scan.tokenize_bytes_repr_bug = True
  c.data.source_batch = BATCH
  c.data.target_batch = BATCH

  c.model.embed_dim = 1024      # image features are SCAN's 2048-d regions (read from the data)
  c.model.word_dim = 300
  c.model.sim_dim = 256
  c.model.similarity = "saf"
  c.model.sgr_steps = 3
  c.model.text_dropout = 0.4
  c.model.head_dropout = 0.4
  c.model.disc_hidden = (512, 64)
  c.model.disc_init = "reference"
  c.model.disc_init_std = 0.01

  c.loss.triplet_weight = 1.0
  c.loss.margin = 0.2
  c.loss.max_violation = True
  c.loss.triplet_reduction = "sum"
  c.loss.adv_weight = 1.0
  c.loss.struct_weight = 1e-3
  c.loss.k = 3
  c.loss.tau = 3.0
  c.loss.kl_reduction = "sum"
  c.loss.detach_p = False
  c.loss.frag_agg = "sum"
  c.loss.pad_zero_candidate = True
  c.loss.disc_pool_caption = "padded_mean"
  c.loss.disc_grad_mode = "reference"

  epoch = scan_transfer.steps_per_epoch(scan_transfer.TRAIN_CAPTIONS[target], BATCH)
  c.optim.lr = 1e-4
  c.optim.disc_lr = 1e-4
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.grad_clip = 2.0
  c.optim.clip_scope = "joint"
  c.optim.lr_decay_steps = LR_DECAY_EPOCHS * epoch
  c.optim.lr_decay_factor = 0.1

  c.train.num_steps = epochs * epoch
  c.train.eval_every = epoch
  c.train.checkpoint_every = 1000
  c.train.log_every = 100

  c.eval.splits = ("target_test",)
  c.eval.protocols.target_test = scan_transfer.TEST_PROTOCOLS[target]
  c.eval.protocols.source_test = scan_transfer.TEST_PROTOCOLS[source]
  c.eval.batch_size = 100       # SGRAF's 100 x 100 scoring shards
  return c


def epochs_arg(kv, default: int) -> int:
  """The `epochs=N` of the arg (a positive integer)."""
  value = kv.get("epochs", str(default))
  if not value.isdigit() or int(value) < 1:
    raise ConfigError(f"config arg epochs={value!r} must be a positive integer, e.g. epochs=3")
  return int(value)


def get_config(arg: str = ""):
  variants, kv = config_lib.parse_arg(arg, known_keys=("seed", "epochs"))
  config = reference_config(scenario_arg(variants), epochs_arg(kv, EPOCHS))
  config.seed = int(kv.get("seed", 0))
  config_lib.apply_variants(config, variants)
  config.lock()
  return config


def hyper_sweeps() -> dict:
  """Sweeps over the transfer ablation and the loss hyper-parameters (docs/method.md 10)."""
  return {
      "": lambda: sweep_lib.transfer_ablation(SEEDS),
      "lambda": lambda: sweep_lib.with_seeds(
          sweep_lib.axis("loss.struct_weight", (1e-4, 1e-3, 1e-2)), SEEDS),
      "adv": lambda: sweep_lib.with_seeds(sweep_lib.axis("loss.adv_weight", (0.1, 1.0)), SEEDS),
      "k": lambda: sweep_lib.with_seeds(sweep_lib.axis("loss.k", (1, 3, 5, 10)), SEEDS),
      "tau": lambda: sweep_lib.with_seeds(sweep_lib.axis("loss.tau", (0.5, 1.0, 3.0, 10.0)),
                                          SEEDS),
  }


def sweep(name: str = ""):
  """Sweeps of the reference, each over seeds 0, 1, 2; give the scenario and the warm start
  with the base config (`:coco2f30k`, `--config.train.init_from=...`).

    '' (default)  full AECR, w/o semantic transfer, w/o structural transfer, source-only
                  fine-tuning, and the target-paired oracle as a reference row
    lambda        loss.struct_weight in {1e-4, 1e-3, 1e-2}
    adv           loss.adv_weight in {0.1, 1}
    k             loss.k in {1, 3, 5, 10}
    tau           loss.tau in {0.5, 1, 3, 10}
    quirks        the reference, then one switch of docs/reference.md changed at a time: the
                  clean values and the options detach_p, kl_reduction=mean, frag_agg=mean
                  (not the tokenisation: that one must match the warm start's)
  """
  switches = {**CLEAN_SWITCHES, "loss.detach_p": True, "loss.kl_reduction": "mean",
              "loss.frag_agg": "mean"}
  del switches["data.scan.tokenize_bytes_repr_bug"]
  quirks = [sweep_lib.named("reference")] + [
      sweep_lib.named(f"{field}={value}", fields={field: value})
      for field, value in switches.items()]
  return sweep_lib.choose(name, {**hyper_sweeps(),
                                 "quirks": lambda: sweep_lib.with_seeds(quirks, SEEDS)})
