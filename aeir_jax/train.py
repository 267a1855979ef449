"""Training: the state, one jitted AEIR step, and the loop (evaluate, checkpoint, log).

What one step does (docs/method.md section 6), in one compiled function over global arrays:
  1. encode the source batch (paired) and the target batch (unpaired images and captions);
  2. source consistency: hinge triplet with hardest negatives on the source score matrix;
  3. semantic transfer: per-modality discriminators on pooled embeddings; the discriminators
     descend their domain-classification loss on stop-gradient features, the encoders descend
     the inverted-label loss;
  4. structural transfer: top-K KL in both modality directions;
  5. clip (jointly or per group) and apply two optax Adam updates, encoders and discriminators,
     simultaneously; a non-finite loss or gradient skips the update.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from aeir_jax import artifacts, checkpoints, config_lib, losses, parallel
from aeir_jax.data import load_data
from aeir_jax.data.samplers import PairedSampler, UnpairedSampler, gather
from aeir_jax.errors import UserError, WorkdirError
from aeir_jax.evaluate import Evaluator, pooled_embeddings, retrieval_examples
from aeir_jax.logging_lib import MetricsWriter, format_results_table
from aeir_jax.models.aeir import AEIRModel
from aeir_jax.models.discriminator import Discriminators


class NumericalError(RuntimeError):
  """Raised when `train.on_nonfinite='stop'` and a step produced non-finite values."""


# ----------------------------------------------------------------------------- model & state


def build_models(config, data):
  model = AEIRModel(config.model, vocab_size=data.vocab_size, caption_dim=data.caption_dim)
  discs = Discriminators(hidden=tuple(config.model.disc_hidden), init_scheme=config.model.disc_init,
                         init_std=config.model.disc_init_std)
  return model, discs


def _schedule(lr, optim):
  if optim.lr_decay_steps > 0:
    return optax.exponential_decay(lr, optim.lr_decay_steps, optim.lr_decay_factor,
                                   staircase=True)
  return optax.constant_schedule(lr)


def build_optimizers(config):
  """Adam for the encoders and for the discriminators (PyTorch's eps convention)."""
  o = config.optim
  return {"enc": optax.adam(_schedule(o.lr, o), b1=o.b1, b2=o.b2, eps=o.eps),
          "disc": optax.adam(_schedule(o.disc_lr, o), b1=o.b1, b2=o.b2, eps=o.eps)}


def _dummy_inputs(data, batch=2):
  split = data.source.train
  regions = np.zeros((batch,) + split.images.shape[1:], np.float32)
  captions = np.zeros((batch,) + split.captions.shape[1:], split.captions.dtype)
  return regions, captions, np.full((batch,), 2, np.int32)


def init_state(config, model, discs, txs, data, rng):
  """The full train state as a plain pytree (what Orbax saves)."""
  k_model, k_drop, k_disc, k_train = jax.random.split(rng, 4)
  regions, captions, lengths = _dummy_inputs(data)
  variables = model.init({"params": k_model, "dropout": k_drop}, regions, captions, lengths,
                         train=False)
  variables = dict(variables)
  enc_params = variables.pop("params")
  embed = config.model.embed_dim
  disc_params = discs.init(k_disc, jnp.zeros((2, embed)), jnp.zeros((2, embed)))["params"]
  params = {"enc": enc_params, "disc": disc_params}
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt": {"enc": txs["enc"].init(params["enc"]), "disc": txs["disc"].init(params["disc"])},
      "model_state": variables,          # e.g. SGRAF BatchNorm statistics; {} for cosine
      "rng": k_train,
      "nonfinite_steps": jnp.zeros((), jnp.int32),
  }


# ----------------------------------------------------------------------------- the step


def _global_norm(tree):
  return optax.tree.norm(tree)


def _clip(grads, config):
  """PyTorch clip_grad_norm_ semantics: scale by clip / (norm + 1e-6) when that is < 1."""
  clip = config.optim.grad_clip
  norms = {k: _global_norm(v) for k, v in grads.items()}
  if clip <= 0:
    return grads, norms
  if config.optim.clip_scope == "joint":
    total = jnp.sqrt(sum(n ** 2 for n in norms.values()))
    factor = jnp.minimum(1.0, clip / (total + 1e-6))
    return jax.tree.map(lambda g: g * factor, grads), norms
  clipped = {k: jax.tree.map(lambda g, n=norms[k]: g * jnp.minimum(1.0, clip / (n + 1e-6)), v)
             for k, v in grads.items()}
  return clipped, norms


def make_loss_fn(config, model, discs, num_devices=1):
  """Returns loss_fn(params, model_state, batch, rng) -> (objective, (metrics, model_state)).

  `num_devices`: how many devices the batch is sharded over (lays out the structural loss's
  blocks, `loss.struct_block_mb`).

  The objective is L_enc(theta_E) + L_D(theta_D) arranged so that one gradient gives each
  player its own gradient: the discriminator loss sees stop-gradient features, and in `clean`
  mode the encoders' adversarial loss sees stop-gradient discriminator parameters. In
  `reference` mode the discriminators also receive the gradient of the adversarial term, as
  the reference code does (docs/method.md 6.2).
  """
  lc = config.loss

  def loss_fn(params, model_state, batch, rng):
    r_src, r_tgt, r_head = jax.random.split(rng, 3)
    variables = {"params": params["enc"], **model_state}
    src, tgt = batch["source"], batch["target"]
    apply = model.apply
    src_img = apply(variables, src["images"], method=model.encode_images)
    tgt_img = apply(variables, tgt["images"], method=model.encode_images)
    src_cap, src_mask = apply(variables, src["captions"], src["lengths"], train=True,
                              rngs={"dropout": r_src}, method=model.encode_captions)
    tgt_cap, tgt_mask = apply(variables, tgt["captions"], tgt["lengths"], train=True,
                              rngs={"dropout": r_tgt}, method=model.encode_captions)
    mut = list(model_state.keys())
    if mut:
      scores, new_model_state = apply(variables, src_img, src_cap, src_mask, train=True,
                                      rngs={"dropout": r_head}, method=model.score, mutable=mut)
    else:
      scores = apply(variables, src_img, src_cap, src_mask, train=True,
                     rngs={"dropout": r_head}, method=model.score)
      new_model_state = model_state
    scores = scores.astype(jnp.float32)
    l_trip = losses.triplet_loss(scores, lc.margin, lc.max_violation, lc.triplet_reduction)

    # Semantic transfer: discriminators on pooled embeddings.
    ones_s = jnp.ones(src_img.shape[:2], bool)
    ones_t = jnp.ones(tgt_img.shape[:2], bool)
    pooled = {
        "img_s": losses.pool_fragments(src_img, ones_s),
        "img_t": losses.pool_fragments(tgt_img, ones_t),
        "cap_s": losses.pool_fragments(src_cap, src_mask, lc.disc_pool_caption),
        "cap_t": losses.pool_fragments(tgt_cap, tgt_mask, lc.disc_pool_caption),
    }
    disc_params_for_enc = params["disc"]
    if lc.disc_grad_mode == "clean":
      disc_params_for_enc = jax.lax.stop_gradient(disc_params_for_enc)
    d_apply = lambda p, a, b: discs.apply({"params": p}, a, b)
    zi_s, zc_s = d_apply(disc_params_for_enc, pooled["img_s"], pooled["cap_s"])
    zi_t, zc_t = d_apply(disc_params_for_enc, pooled["img_t"], pooled["cap_t"])
    sg = jax.lax.stop_gradient
    di_s, dc_s = d_apply(params["disc"], sg(pooled["img_s"]), sg(pooled["cap_s"]))
    di_t, dc_t = d_apply(params["disc"], sg(pooled["img_t"]), sg(pooled["cap_t"]))
    _, adv_img, _ = losses.adversarial_losses(zi_s, zi_t)
    _, adv_cap, _ = losses.adversarial_losses(zc_s, zc_t)
    disc_img, _, acc_img = losses.adversarial_losses(di_s, di_t)
    disc_cap, _, acc_cap = losses.adversarial_losses(dc_s, dc_t)

    # Structural transfer, both directions.
    s_i2c, s_c2i = losses.structural_loss(
        tgt_img, tgt_cap, tgt_mask, src_img, src_cap, src_mask, k=lc.k, tau=lc.tau,
        reduction=lc.kl_reduction, detach_p=lc.detach_p, agg=lc.frag_agg,
        pad_zero_candidate=lc.pad_zero_candidate,
        block_bytes=int(lc.struct_block_mb * 2 ** 20), shards=num_devices)

    enc_objective = (lc.triplet_weight * l_trip + lc.adv_weight * (adv_img + adv_cap)
                     + lc.struct_weight * (s_i2c + s_c2i))
    disc_objective = disc_img + disc_cap
    metrics = {
        "loss/encoder": enc_objective, "loss/triplet": l_trip,
        "loss/adv_image": adv_img, "loss/adv_caption": adv_cap,
        "loss/disc_image": disc_img, "loss/disc_caption": disc_cap,
        "loss/struct_img2cap": s_i2c, "loss/struct_cap2img": s_c2i,
        "disc/acc_image": acc_img, "disc/acc_caption": acc_cap,
    }
    return enc_objective + disc_objective, (metrics, new_model_state)

  return loss_fn


def make_train_step(config, model, discs, txs, num_devices=1):
  """Returns the pure step `(state, batch) -> (state, metrics)` (not yet jitted)."""
  loss_fn = make_loss_fn(config, model, discs, num_devices)

  def train_step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    grads, (metrics, new_model_state) = jax.grad(loss_fn, has_aux=True)(
        state["params"], state["model_state"], batch, rng)
    grads, norms = _clip(grads, config)
    new_params, new_opt = {}, {}
    for group in ("enc", "disc"):
      updates, new_opt[group] = txs[group].update(grads[group], state["opt"][group],
                                                  state["params"][group])
      new_params[group] = optax.apply_updates(state["params"][group], updates)
    finite = jnp.isfinite(metrics["loss/encoder"]) & jnp.isfinite(
        metrics["loss/disc_image"] + metrics["loss/disc_caption"])
    finite &= jnp.isfinite(norms["enc"]) & jnp.isfinite(norms["disc"])
    # A non-finite step is skipped under both on_nonfinite policies: the state stays good.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_params = keep(new_params, state["params"])
    new_opt = keep(new_opt, state["opt"])
    new_model_state = keep(new_model_state, state["model_state"])
    new_state = dict(state, step=state["step"] + 1, params=new_params, opt=new_opt,
                     model_state=new_model_state,
                     nonfinite_steps=state["nonfinite_steps"] + (~finite).astype(jnp.int32))
    metrics = dict(metrics, **{
        "grad_norm/enc": norms["enc"], "grad_norm/disc": norms["disc"],
        "param_norm/enc": _global_norm(state["params"]["enc"]),
        "nonfinite": (~finite).astype(jnp.float32),
    })
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------- the loop


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _Prefetch:
  """Builds host batches for upcoming steps in a background thread."""

  def __init__(self, make_batch, start, stop, depth=2):
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()

    def work():
      for step in range(start, stop):
        if self._stop.is_set():
          return
        try:
          self._queue.put((step, make_batch(step)))
        except Exception as e:  # pylint: disable=broad-except
          self._queue.put((step, e))
          return

    self._thread = threading.Thread(target=work, daemon=True)
    self._thread.start()

  def get(self):
    step, batch = self._queue.get()
    if isinstance(batch, Exception):
      raise batch
    return step, batch

  def close(self):
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get_nowait()  # unblocks a producer waiting on a full queue
      except queue.Empty:
        pass
      self._thread.join(timeout=0.05)


def _check_workdir(workdir, config):
  """The workdir must be writable, and a run already in it must have a compatible config."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable ({e.strerror}); pass a --workdir "
                       "you can write to") from None
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path) and os.path.isdir(os.path.join(workdir, "checkpoints")):
    with open(path) as f:
      previous = json.load(f)
    diff = config_lib.incompatible_fields(previous, json.loads(config.to_json()))
    if diff:
      raise WorkdirError(
          f"workdir {workdir} holds a run with a different config ({'; '.join(diff)}); "
          "use a new --workdir, or restore those values to resume")


def _restore_or_init(config, ckpt, init_fn, abstract, state_sharding, rng):
  """Resumes from the workdir's latest checkpoint, or initialises (optionally `init_from`)."""
  latest = ckpt.latest_step()
  if latest is not None:
    state, meta = ckpt.restore(latest, abstract)
    print(f"Resuming from step {latest} in {os.path.dirname(ckpt.directory)}", flush=True)
    return state, meta
  state = jax.jit(init_fn, out_shardings=state_sharding)(rng)
  if config.train.init_from:
    loaded = checkpoints.load_params(config.train.init_from)
    for key, target in (("params", state["params"]["enc"]),) + tuple(
        (k, v) for k, v in state["model_state"].items() if k in loaded):
      if not checkpoints.tree_shapes_match(loaded[key], target):
        raise WorkdirError(
            f"train.init_from={config.train.init_from}: its {key} have other shapes than this "
            "config's model; check model dims, similarity head and vocabulary size")
    state["params"]["enc"] = jax.tree.map(
        lambda new, old: jax.device_put(new, old.sharding), loaded["params"],
        state["params"]["enc"])
    state["model_state"] = {k: jax.tree.map(lambda new, old: jax.device_put(new, old.sharding),
                                            loaded.get(k, v), v)
                            for k, v in state["model_state"].items()}
  return state, {"examples_seen": 0, "train_seconds": 0.0, "eval_metrics": {}}


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
  """Trains (or resumes) AEIR in `workdir`; returns the final metrics.

  `devices` defaults to every device of every process (the mesh's `data` axis).
  """
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  _check_workdir(workdir, config)
  is_main = jax.process_index() == 0

  data = load_data(config)
  config_lib.validate_with_data(config, data)
  if is_main:  # written once the config and the data have passed validation
    artifacts.write_json(workdir, "config.json", json.loads(config.to_json()))
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_divisible("data.source_batch", config.data.source_batch, mesh)
  parallel.check_batch_divisible("data.target_batch", config.data.target_batch, mesh)
  batch_sharding = parallel.data_sharding(mesh)
  repl = parallel.replicated(mesh)

  model, discs = build_models(config, data)
  txs = build_optimizers(config)
  rng = jax.random.PRNGKey(config.seed)
  init_fn = lambda r: init_state(config, model, discs, txs, data, r)
  abstract = jax.eval_shape(init_fn, rng)
  state_sharding = jax.tree.map(lambda _: repl, abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sharding)

  ckpt = checkpoints.Checkpointer(workdir, config.train.keep_checkpoints)
  state, meta = _restore_or_init(config, ckpt, init_fn, abstract, state_sharding, rng)
  start = int(state["step"])
  nonfinite_seen = int(state["nonfinite_steps"])

  source_split = data.source.train
  samplers = {
      "source": PairedSampler(source_split, config.data.source_batch, config.seed,
                              jax.process_index(), jax.process_count()),
      "target": UnpairedSampler(data.target.train, config.data.target_batch, config.seed,
                                jax.process_index(), jax.process_count()),
  }

  def make_batch(step):
    out = {}
    for name, split in (("source", source_split), ("target", data.target.train)):
      img_idx, cap_idx = samplers[name].indices(step)
      out[name] = gather(split, img_idx, cap_idx)
    return out

  step_fn = jax.jit(make_train_step(config, model, discs, txs, mesh.devices.size),
                    donate_argnums=0)
  evaluator = Evaluator(model, config.eval.batch_size, batch_sharding, repl)
  eval_splits = config_lib.eval_splits(config, data)
  # A resumed run rewrites its logs up to the restored step, so they match an uninterrupted run.
  writer = MetricsWriter(workdir, enabled=is_main, truncate_after=start)

  def evaluate(step, final=False):
    variables = {"params": state["params"]["enc"], **state["model_state"]}
    out = {}
    for name, split in eval_splits.items():
      metrics, sims = evaluator.evaluate(variables, split, name, return_scores=True,
                                         protocols=config.eval.protocols[name])
      out.update(metrics)
      if final and is_main:
        artifacts.write_json(workdir, f"retrieval/{name}.json",
                             retrieval_examples(sims, split))
    writer.write(step, out, kind="eval")
    # Every process runs the encoders (one SPMD program over the mesh); process 0 writes.
    embeddings = {}
    for domain, split in (("source", data.source.test), ("target", data.target.test)):
      img, cap = pooled_embeddings(evaluator, variables, split, config.eval.embed_samples)
      embeddings[f"image_{domain}"], embeddings[f"caption_{domain}"] = img, cap
    if is_main:
      artifacts.write_npz(workdir, f"embeddings/step_{step}.npz", embeddings)
    # Kept in the checkpoint's meta: a run resumed after its last step still has them.
    meta["eval_metrics"] = out
    return out

  def save(step, force=False):
    positions = {name: s.position(step) for name, s in samplers.items()}
    ckpt.save(step, state, dict(meta, data_position=positions), force=force)

  num_steps = config.train.num_steps
  if start == 0 and config.eval.at_start:
    evaluate(0)
  pairs_per_step = config.data.source_batch + config.data.target_batch
  progress = None
  if is_main and config.train.progress and start < num_steps:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm(total=num_steps, initial=start, unit="step", dynamic_ncols=True)

  prefetch = _Prefetch(make_batch, start, num_steps)
  t_last, n_last = time.time(), 0
  stop_reason = None
  try:
    with _Preemption() as preempt:
      for step in range(start, num_steps):
        _, host_batch = prefetch.get()
        # Steps only dispatch: any implicit host<->device copy here is a bug, and fails.
        with jax.transfer_guard("disallow"):
          batch = parallel.to_global(host_batch, batch_sharding)
          state, metrics = step_fn(state, batch)
        done = step + 1
        meta["examples_seen"] += pairs_per_step
        n_last += 1
        if progress is not None:
          progress.update(1)
        if done % config.train.log_every == 0 or done == num_steps:
          host_metrics, nonfinite = jax.device_get((metrics, state["nonfinite_steps"]))
          host = {k: float(v) for k, v in host_metrics.items()}
          elapsed = time.time() - t_last
          meta["train_seconds"] += elapsed
          writer.write(done, host, kind="train")
          writer.write(done, {"perf/pairs_per_sec": n_last * pairs_per_step / max(elapsed, 1e-9),
                              "perf/examples_seen": meta["examples_seen"]}, kind="perf")
          if progress is not None:
            progress.set_postfix(loss=f"{host['loss/encoder']:.3f}",
                                 pairs_s=f"{n_last * pairs_per_step / max(elapsed, 1e-9):.0f}")
          nonfinite = int(nonfinite)
          if nonfinite > nonfinite_seen:
            writer.write(done, {"nonfinite_steps": nonfinite}, kind="event")
            print(f"warning: {nonfinite - nonfinite_seen} step(s) up to step {done} had a "
                  "non-finite loss or gradient; their updates were skipped", flush=True)
            nonfinite_seen = nonfinite
            if config.train.on_nonfinite == "stop":
              stop_reason = "nonfinite"
          t_last, n_last = time.time(), 0
        if stop_reason is None and (done % config.train.eval_every == 0 or done == num_steps):
          evaluate(done, final=done == num_steps)
          t_last = time.time()
        if preempt.signal and stop_reason is None:
          stop_reason = preempt.signal
        if stop_reason or done % config.train.checkpoint_every == 0 or done == num_steps:
          save(done, force=bool(stop_reason))
        if stop_reason:
          break
  finally:
    prefetch.close()
    if progress is not None:
      progress.close()
    ckpt.close()
    writer.close()

  if stop_reason == "nonfinite":
    raise NumericalError(
        f"non-finite loss or gradient in {int(state['nonfinite_steps'])} step(s) up to step "
        f"{int(state['step'])}; those updates were skipped and the last good state was saved "
        f"in {ckpt.directory}. Lower optim.lr or check the input features")
  if stop_reason:
    print(f"Received {stop_reason}: saved a checkpoint at step {int(state['step'])} in "
          f"{ckpt.directory}; run the same command again to resume.", flush=True)
    return {"interrupted": True, "step": int(state["step"])}

  results = {"step": int(state["step"]), "variant": config.variant, "seed": config.seed,
             **meta["eval_metrics"]}
  if is_main:
    artifacts.write_json(workdir, "results.json", results)
    print(format_results_table(results, config_lib.result_prefixes(config, eval_splits)),
          flush=True)
  return results


__all__ = ["run", "init_state", "make_train_step", "make_loss_fn", "build_models",
           "build_optimizers", "NumericalError", "UserError"]
