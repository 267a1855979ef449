"""Data sources. `load_data(config)` returns the `TransferData` a run trains and evaluates on."""

from __future__ import annotations

import dataclasses

from aeir_jax.data.base import DomainData, RetrievalSplit, TransferData
from aeir_jax.errors import ConfigError

DATA_NAMES = ("synthetic",)


def load_data(config) -> TransferData:
  """Loads the data named by `config.data.name`; with `data.oracle` the source is replaced by
  the target's train split, paired (a target-paired upper bound, not transfer)."""
  name = config.data.name
  if name == "synthetic":
    from aeir_jax.data.synthetic import make_benchmark  # pylint: disable=g-import-not-at-top
    data = make_benchmark(config.data.synthetic, config.data.seed)
  else:
    raise ConfigError(f"data.name={name!r} is not a known data source; use one of "
                      f"{', '.join(DATA_NAMES)}")
  if config.data.oracle:
    oracle_source = dataclasses.replace(data.target.train, name="target_train_paired")
    data = dataclasses.replace(
        data, source=dataclasses.replace(data.source, train=oracle_source))
  return data


__all__ = ["DomainData", "RetrievalSplit", "TransferData", "load_data"]
