"""Command-line handling for launch.py: flags, config loading, clean errors."""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from aeir_jax.errors import ConfigError, UserError

EXIT_USER_ERROR = 2
EXIT_NUMERICAL = 3


def _define_flags():
  fl = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.",
                                  flag_values=fl, lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.",
                      flag_values=fl)
  return fl


def _parse(argv):
  """Parses flags; any problem with them becomes a ConfigError with one line."""
  fl = _define_flags()
  try:
    fl(argv)
  except flags.Error as e:
    raise ConfigError(_flag_error_message(str(e))) from None
  if fl["config"].value is None:
    raise ConfigError("--config is required, e.g. --config configs/default.py")
  if not fl.workdir:
    raise ConfigError("--workdir is required, e.g. --workdir runs/default")
  return fl.config, fl.workdir


def _flag_error_message(text: str) -> str:
  text = " ".join(text.split())
  if "Could not find" in text or "does not exist" in text or "No such file" in text:
    return f"{text}. Check the --config path (e.g. configs/default.py)"
  if "override" in text.lower() or "key" in text.lower():
    return f"{text}. Check the spelling of the --config.* field (see the config file)"
  return text


def main(argv) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    config, workdir = _parse(argv)
    from aeir_jax import train  # pylint: disable=g-import-not-at-top
    try:
      result = train.run(config, workdir)
    except train.NumericalError as e:
      print(f"error: {e}", file=sys.stderr)
      return EXIT_NUMERICAL
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  return 0 if result else 1
