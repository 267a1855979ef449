"""Entry point: flags -> config -> aeir_jax.train.run(config, workdir).

    python launch.py --config configs/default.py --workdir runs/default
    python launch.py --config configs/default.py:smoke --workdir /tmp/smoke \
        --config.train.num_steps=20

Errors a user can fix (config, data, workdir) print one line and exit with code 2.
"""

import sys

from aeir_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main(sys.argv))
