"""Data sources. `load_data(config)` returns the `TransferData` a run trains and evaluates on."""

from __future__ import annotations

import dataclasses
import importlib

from aeir_jax.data.base import DomainData, RetrievalSplit, TransferData
from aeir_jax.errors import ConfigError

# data.name -> "module:function" returning TransferData from the config (imported lazily).
DATA_LOADERS = {
    "synthetic": "aeir_jax.data.synthetic:load_transfer",
    "scan": "aeir_jax.data.scan_transfer:load_transfer",
    "flickr8k": "aeir_jax.data.flickr8k:load_transfer",
}


def load_data(config) -> TransferData:
  """Loads the data named by `config.data.name`; with `data.oracle` the source is replaced by
  the target's train split, paired (a target-paired upper bound, not transfer)."""
  name = config.data.name
  if name not in DATA_LOADERS:
    raise ConfigError(f"data.name={name!r} is not a known data source; use one of "
                      f"{', '.join(DATA_LOADERS)}")
  module_name, function = DATA_LOADERS[name].split(":")
  data = getattr(importlib.import_module(module_name), function)(config)
  if config.data.oracle:
    oracle_source = dataclasses.replace(data.target.train, name="target_train_paired")
    data = dataclasses.replace(
        data, source=dataclasses.replace(data.source, train=oracle_source))
  return data


__all__ = ["DomainData", "RetrievalSplit", "TransferData", "load_data"]
