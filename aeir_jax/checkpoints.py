"""Orbax checkpointing: the full train state for resume, params-only for `init_from`.

Each checkpoint is one step directory holding `state` (params, both optimizer states, model
state, step, rng) and `meta` (JSON: data position, counters). Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save never leaves a checkpoint
that looks finished; `latest_step()` only sees complete ones.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from aeir_jax.errors import WorkdirError


class Checkpointer:
  """Wraps an `ocp.CheckpointManager` over `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "meta"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, force: bool = False):
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract_state):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def save_params(path: str, params):
  """Writes a params-only checkpoint (for `train.init_from`)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), params, force=True)


def load_params(path: str, abstract_params=None):
  """Reads a params-only checkpoint written by `save_params` (or `params` of a train state).

  `path` may be a params checkpoint, a workdir (its latest train checkpoint's encoder params
  are used) or a train checkpoint step directory.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise WorkdirError(f"init_from: {path} does not exist; point train.init_from at a params "
                       "checkpoint or at a finished workdir")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    mngr = ocp.CheckpointManager(os.path.join(path, "checkpoints"), item_names=("state", "meta"))
    step = mngr.latest_step()
    if step is None:
      raise WorkdirError(f"init_from: {path} holds no complete checkpoint")
    path = os.path.join(path, "checkpoints", str(step))
  if os.path.isdir(os.path.join(path, "state")):
    with ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(os.path.join(path, "state"))
    return state["params"]["enc"]
  with ocp.StandardCheckpointer() as ckptr:
    if abstract_params is not None:
      return ckptr.restore(path, abstract_params)
    return ckptr.restore(path)


def tree_shapes_match(a, b) -> bool:
  sa = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), a)
  sb = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), b)
  return sa == sb
