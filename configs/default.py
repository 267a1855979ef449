"""AEIR on the built-in two-domain benchmark (the default job; runs on a laptop CPU).

    python launch.py --config configs/default.py --workdir runs/default
    python launch.py --config configs/default.py:smoke --workdir /tmp/smoke
    python launch.py --config configs/default.py:source_only,seed=1 --workdir runs/so1

The arg is a comma-separated list of variant names and key=value pairs:
  variants: aeir (default), source_only, semantic_only, structural_only, oracle, smoke
  seed=N    the training seed (the benchmark data is the same for every seed)
Single fields: --config.loss.tau=1.0, --config.train.num_steps=500, ...

Sweeps (see `sweep` below and aeir_jax/sweep.py):
    python launch.py --config configs/default.py --sweep --workdir runs/ablation
    python launch.py --config configs/default.py:smoke --sweep k --workdir /tmp/k --dry-run
    python -m aeir_jax.sweep collect runs/ablation
"""

from aeir_jax import config_lib
from aeir_jax import sweep as sweep_lib

SEEDS = (0, 1, 2)


def get_config(arg: str = ""):
  config = config_lib.base_config()
  variants, kv = config_lib.parse_arg(arg, known_keys=("seed",))
  config.seed = int(kv.get("seed", 0))
  config_lib.apply_variants(config, variants)
  config.lock()
  return config


def sweep(name: str = ""):
  """Sweeps on the built-in benchmark, each over seeds 0, 1, 2.

    '' (default)  full AEIR, w/o semantic transfer, w/o structural transfer, source only;
                  plus the target-paired oracle as a reference row (an upper bound, not a
                  transfer method)
    k             loss.k in {1, 3, 5, 10}
    tau           loss.tau in {0.5, 1, 3, 10}
  """
  return sweep_lib.choose(name, {
      "": lambda: sweep_lib.transfer_ablation(SEEDS),
      "k": lambda: sweep_lib.with_seeds(sweep_lib.axis("loss.k", (1, 3, 5, 10)), SEEDS),
      "tau": lambda: sweep_lib.with_seeds(sweep_lib.axis("loss.tau", (0.5, 1.0, 3.0, 10.0)),
                                          SEEDS),
  })
