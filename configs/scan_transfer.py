"""AEIR on Flickr30K <-> MS-COCO with the clean choices of docs/reference.md.

The hyper-parameters, schedule and evaluation of configs/aecr_reference.py, with every quirk
switch whose clean value differs set to it (`aecr_reference.CLEAN_SWITCHES`): discriminators
trained on their own loss only (GAN-style), per-group gradient clipping, caption pooling over
the real words, padded words masked out of the structural loss's max, and tokenisation of the
decoded caption text (warm-start from `configs/sgraf_source.py:<scenario>,clean`).

    python launch.py --config configs/scan_transfer.py:coco2f30k --workdir runs/clean_coco2f30k \
        --config.data.scan.root=DATA --config.data.scan.vocab_path=VOCAB.json \
        --config.train.init_from=runs/sgraf_coco2f30k_clean

The arg is that of configs/aecr_reference.py: scenario (f30k2coco | coco2f30k), a transfer
variant, smoke, seed=N, epochs=N.
"""

from aeir_jax import config_lib
from aeir_jax import sweep as sweep_lib
from configs import aecr_reference


def get_config(arg: str = ""):
  variants, kv = config_lib.parse_arg(arg, known_keys=("seed", "epochs"))
  config = aecr_reference.reference_config(aecr_reference.scenario_arg(variants),
                                           aecr_reference.epochs_arg(kv, aecr_reference.EPOCHS))
  config.seed = int(kv.get("seed", 0))
  config_lib.override(config, aecr_reference.CLEAN_SWITCHES)
  config_lib.apply_variants(config, variants)
  config.lock()
  return config


def sweep(name: str = ""):
  """The hyper-parameter sweeps of configs/aecr_reference.py ('', lambda, adv, k, tau)."""
  return sweep_lib.choose(name, aecr_reference.hyper_sweeps())
