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


def save_params(path: str, params, model_state=None):
  """Writes a params-only checkpoint `{'params': ..., **model_state}` (for `train.init_from`).

  The same layout as `python -m aeir_jax.tools.import_torch` writes.
  """
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), {"params": params, **(model_state or {})}, force=True)


def load_params(path: str) -> dict:
  """Reads encoder params (and model state, e.g. BatchNorm statistics) for `init_from`.

  `path` may be a params checkpoint (`save_params`, `import_torch`), a finished workdir (its
  latest checkpoint is used) or one train checkpoint step directory. Returns
  `{'params': ..., **model_state}` as host arrays.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise WorkdirError(f"init_from: {path} does not exist; point train.init_from at a params "
                       "checkpoint or at a finished workdir")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    step = ocp.CheckpointManager(os.path.join(path, "checkpoints"),
                                 item_names=("state", "meta")).latest_step()
    if step is None:
      raise WorkdirError(f"init_from: {path} holds no complete checkpoint")
    path = os.path.join(path, "checkpoints", str(step))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      if os.path.isdir(os.path.join(path, "state")):
        state = ckptr.restore(os.path.join(path, "state"))
        return {"params": state["params"]["enc"], **state["model_state"]}
      tree = ckptr.restore(path)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise WorkdirError(f"init_from: {path} is not a readable params checkpoint ({e}); create "
                       "one with save_params or tools.import_torch") from None
  if "params" not in tree:
    raise WorkdirError(f"init_from: {path} has no 'params' entry; create it with save_params "
                       "or tools.import_torch")
  return {k: v for k, v in tree.items() if k != "discriminators"}


def tree_shapes_match(a, b) -> bool:
  sa = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), a)
  sb = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), b)
  return sa == sb
