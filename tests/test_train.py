"""The train step and loop: mesh equivalence, resume equivalence, discriminator gradient modes,
init_from, and the smoke config end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aeir_jax import checkpoints, config_lib, parallel, train
from aeir_jax.data import load_data
from aeir_jax.data.samplers import PairedSampler, UnpairedSampler, gather
from configs import default as default_config


def smoke_config(arg="smoke", **overrides):
  return config_lib.override(default_config.get_config(arg), overrides)


def _setup(config):
  data = load_data(config)
  model, discs = train.build_models(config, data)
  txs = train.build_optimizers(config)
  return data, model, discs, txs


def _host_batch(config, data, step):
  src = PairedSampler(data.source.train, config.data.source_batch, config.seed)
  tgt = UnpairedSampler(data.target.train, config.data.target_batch, config.seed)
  return {"source": gather(data.source.train, *src.indices(step)),
          "target": gather(data.target.train, *tgt.indices(step))}


def _run_steps(config, devices, num_steps=2):
  data, model, discs, txs = _setup(config)
  mesh = parallel.make_mesh(devices)
  repl, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
  init = lambda r: train.init_state(config, model, discs, txs, data, r)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  state = jax.jit(init, out_shardings=jax.tree.map(lambda _: repl, abstract))(
      jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(config, model, discs, txs))
  history = []
  for i in range(num_steps):
    state, metrics = step(state, parallel.to_global(_host_batch(config, data, i), shard))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


@pytest.mark.parametrize("mode", ["clean", "reference"])
def test_one_vs_eight_devices_same_step(mode):
  config = smoke_config(**{"loss.disc_grad_mode": mode, "model.text_dropout": 0.0})
  s1, h1 = _run_steps(config, jax.devices()[:1])
  s8, h8 = _run_steps(config, jax.devices()[:8])
  assert len(jax.devices()) == 8
  for m1, m8 in zip(h1, h8):
    for k in m1:
      np.testing.assert_allclose(m1[k], m8[k], rtol=2e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
               s1["params"], s8["params"])


def test_discriminator_gradient_modes_match_formula():
  """The discriminators' output-bias gradient, from the logits, in both modes.

  clean:      d/db [L_D]                  = mean(-sig(-z_s)) + mean(sig(z_t))
  reference:  d/db [L_D + w * L_adv]      adds w * (mean(sig(z_s)) - mean(sig(-z_t)))
  summed over image and caption discriminators' own biases separately.
  """
  base = smoke_config(**{"loss.adv_weight": 0.7, "model.text_dropout": 0.0,
                         "optim.grad_clip": 0.0})
  data, model, discs, txs = _setup(base)
  state = train.init_state(base, model, discs, txs, data, jax.random.PRNGKey(3))
  batch = jax.tree.map(jnp.asarray, _host_batch(base, data, 0))

  variables = {"params": state["params"]["enc"]}
  enc = lambda d: (model.apply(variables, d["images"], method=model.encode_images),
                   *model.apply(variables, d["captions"], d["lengths"], method=model.encode_captions))
  from aeir_jax import losses
  logits = {}
  for dom in ("source", "target"):
    img, cap, mask = enc(batch[dom])
    pi = losses.pool_fragments(img, jnp.ones(img.shape[:2], bool))
    pc = losses.pool_fragments(cap, mask, base.loss.disc_pool_caption)
    logits[dom] = [np.asarray(z, np.float64) for z in
                   discs.apply({"params": state["params"]["disc"]}, pi, pc)]
  sig = lambda z: 1 / (1 + np.exp(-z))
  for mode in ("clean", "reference"):
    config = smoke_config(**{"loss.adv_weight": 0.7, "model.text_dropout": 0.0,
                             "loss.disc_grad_mode": mode})
    loss_fn = train.make_loss_fn(config, model, discs)
    grads, _ = jax.grad(loss_fn, has_aux=True)(state["params"], state["model_state"], batch,
                                               jax.random.PRNGKey(0))
    for m, name in enumerate(("image", "caption")):
      zs, zt = logits["source"][m], logits["target"][m]
      want = np.mean(-sig(-zs)) + np.mean(sig(zt))
      if mode == "reference":
        want += 0.7 * (np.mean(sig(zs)) - np.mean(sig(-zt)))
      got = float(grads["disc"][name]["out"]["bias"][0])
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7, err_msg=f"{mode}/{name}")


def _final_params(workdir):
  step = checkpoints.Checkpointer(workdir, 2, async_save=False).latest_step()
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return step, state


def test_resume_equals_uninterrupted(tmp_path, one_device):
  config = smoke_config(**{"train.num_steps": 6, "train.checkpoint_every": 3})
  straight = tmp_path / "straight"
  train.run(config, str(straight), devices=one_device)

  resumed = tmp_path / "resumed"
  first = smoke_config(**{"train.num_steps": 3, "train.checkpoint_every": 3})
  train.run(first, str(resumed), devices=one_device)
  step, _ = _final_params(resumed)
  assert step == 3
  train.run(config, str(resumed), devices=one_device)

  s_step, s_state = _final_params(straight)
  r_step, r_state = _final_params(resumed)
  assert s_step == r_step == 6
  jax.tree.map(np.testing.assert_array_equal, s_state["params"], r_state["params"])
  jax.tree.map(np.testing.assert_array_equal, s_state["opt"], r_state["opt"])
  final = lambda d: json.loads((d / "results.json").read_text())
  assert final(straight) == final(resumed)


def test_smoke_run_writes_outputs(tmp_path, one_device):
  config = smoke_config()
  results = train.run(config, str(tmp_path), devices=one_device)
  assert results["step"] == config.train.num_steps
  for key in ("target_test/rsum", "target_test/i2t_r1", "source_test/t2i_r10"):
    assert 0 <= results[key] <= (600 if key.endswith("rsum") else 100)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  kinds = {l["kind"] for l in lines}
  assert kinds == {"train", "eval"}
  train_keys = set(next(l for l in lines if l["kind"] == "train"))
  assert {"loss/triplet", "loss/adv_image", "loss/struct_img2cap", "disc/acc_caption",
          "grad_norm/enc"} <= train_keys
  perf = [json.loads(l) for l in (tmp_path / "perf.jsonl").read_text().splitlines()]
  assert perf and all(p["perf/pairs_per_sec"] > 0 for p in perf)
  assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())
  assert json.loads((tmp_path / "results.json").read_text())["step"] == config.train.num_steps


def test_init_from_loads_encoder_params(tmp_path, one_device):
  config = smoke_config()
  train.run(config, str(tmp_path / "source"), devices=one_device)
  _, src_state = _final_params(tmp_path / "source")
  params_dir = tmp_path / "params"
  checkpoints.save_params(str(params_dir), src_state["params"]["enc"], src_state["model_state"])
  warm = smoke_config(**{"train.init_from": str(params_dir), "train.num_steps": 1,
                         "eval.at_start": False, "optim.lr": 1e-30, "optim.disc_lr": 1e-30})
  train.run(warm, str(tmp_path / "warm"), devices=one_device)
  _, warm_state = _final_params(tmp_path / "warm")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               src_state["params"]["enc"], warm_state["params"]["enc"])
