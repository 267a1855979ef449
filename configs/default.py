"""AEIR on the built-in two-domain benchmark (the default job; runs on a laptop CPU).

    python launch.py --config configs/default.py --workdir runs/default
    python launch.py --config configs/default.py:smoke --workdir /tmp/smoke
    python launch.py --config configs/default.py:source_only,seed=1 --workdir runs/so1

The arg is a comma-separated list of variant names and key=value pairs:
  variants: aeir (default), source_only, semantic_only, structural_only, oracle, smoke
  seed=N    the training seed (the benchmark data is the same for every seed)
Single fields: --config.loss.tau=1.0, --config.train.num_steps=500, ...
"""

from aeir_jax import config_lib


def get_config(arg: str = ""):
  config = config_lib.base_config()
  variants, kv = config_lib.parse_arg(arg, known_keys=("seed",))
  config.seed = int(kv.get("seed", 0))
  config_lib.apply_variants(config, variants)
  config.lock()
  return config


def sweep():
  """The ablation sweep on the built-in benchmark: 4 variants x 3 seeds (+ the oracle)."""
  return config_lib.ablation_sweep()
