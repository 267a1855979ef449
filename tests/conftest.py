"""Test setup: 8 fake CPU devices (for mesh equivalence tests) and shared fixtures."""

import os
import pathlib
import sys

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


@pytest.fixture
def one_device():
  return jax.devices()[:1]


def shared_path(*parts):
  """A path under the shared data folder beside the repository, or a pytest skip."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} is absent: these tests need the shared data folder beside the repo")
  return path


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
