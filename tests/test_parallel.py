"""Multi-host start, global-batch assembly, the structural loss in blocks on a mesh, and the
step's precision and transfer hygiene (bfloat16 encoders, rematerialised GRU, no implicit
host-device copies)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aeir_jax import losses, parallel, train
from aeir_jax.data.samplers import PairedSampler, UnpairedSampler
from aeir_jax.errors import ConfigError
from configs import aecr_reference
from test_train import _host_batch, _setup, smoke_config

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "SLURM_STEP_NODELIST", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri",
                "OMPI_COMM_WORLD_SIZE")


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls in a clean single-machine environment."""
  for name in _CLUSTER_ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(parallel, "_on_tpu_vm", lambda: False)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a: recorded.append(a))
  return recorded


def test_initialize_distributed_single_process_is_a_noop(calls, monkeypatch):
  assert not parallel.initialize_distributed()
  assert not parallel.initialize_distributed(num_processes=1)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  assert not parallel.initialize_distributed()
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  assert not parallel.initialize_distributed()
  assert calls == []


def test_initialize_distributed_values_and_environment(calls, monkeypatch):
  assert parallel.initialize_distributed("host0:1234", 4, 2)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host1:99")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "8")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert parallel.initialize_distributed()
  assert parallel.initialize_distributed(process_id=5)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name)
  # Inside `srun` with 4 tasks: jax.distributed detects the values itself.
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-4]")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert parallel.initialize_distributed()
  assert calls == [("host0:1234", 4, 2), ("host1:99", 8, 3), ("host1:99", 8, 5),
                   (None, None, None)]
  monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
  with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES"):
    parallel.initialize_distributed()
  for name in ("JAX_NUM_PROCESSES", "SLURM_STEP_NODELIST", "SLURM_NTASKS"):
    monkeypatch.delenv(name)
  with pytest.raises(ConfigError, match="num_processes, process_id"):
    parallel.initialize_distributed("host0:1234")


def test_process_slices_assemble_the_global_batch():
  """Two processes' samplers cover the global batch in order; to_global keeps it whole."""
  config = smoke_config()
  data, _, _, _ = _setup(config)
  split = data.target.train
  for sampler in (PairedSampler, UnpairedSampler):
    whole = sampler(split, 8, seed=1).indices(3)
    parts = [sampler(split, 8, 1, process_index=p, process_count=2).indices(3)
             for p in (0, 1)]
    for i, indices in enumerate(whole):
      np.testing.assert_array_equal(np.concatenate([part[i] for part in parts]), indices)
  mesh = parallel.make_mesh()
  local = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  global_array = parallel.to_global({"x": local}, parallel.data_sharding(mesh))["x"]
  assert global_array.sharding.spec == parallel.data_sharding(mesh).spec
  assert len(global_array.addressable_shards) == 8
  np.testing.assert_array_equal(jax.device_get(global_array), local)


def _plain_frag_sim(x, mask_x, y, mask_y, agg, pad_zero_candidate):
  """phi by autodiff of the direct formula (the [A, B, Fx, Fy] cosines at once)."""
  cos = jnp.einsum("ard,bwd->abrw", losses._unit(x), losses._unit(y))
  cos = jnp.where(mask_x[:, None, :, None], cos, 0.0 if pad_zero_candidate else -jnp.inf)
  best = jnp.where(mask_y[None], cos.max(axis=-2), 0.0).sum(-1)
  return best / jnp.maximum(mask_y.sum(-1), 1)[None] if agg == "mean" else best


def _fragments(rng, n, f, d):
  mask = np.arange(f)[None, :] < rng.integers(1, f + 1, n)[:, None]
  return (rng.normal(size=(n, f, d)) * mask[..., None]).astype(np.float32), mask


@pytest.mark.parametrize("agg,pad_zero_candidate", [("sum", False), ("mean", True)])
def test_frag_sim_gradient_matches_autodiff(agg, pad_zero_candidate):
  rng = np.random.default_rng(0)
  x, mx = _fragments(rng, 12, 5, 8)
  y, my = _fragments(rng, 10, 6, 8)
  weights = rng.normal(size=(12, 10)).astype(np.float32)
  grads = {}
  for name, fn in (("plain", _plain_frag_sim),
                   ("blocks", functools.partial(losses.frag_sim, block_bytes=3 * 5 * 60 * 4)),
                   ("one block", losses.frag_sim)):
    f = lambda x, y, fn=fn: (fn(x, mx, y, my, agg, pad_zero_candidate) * weights).sum()
    grads[name] = jax.value_and_grad(f, argnums=(0, 1))(x, y)
  for name in ("blocks", "one block"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 grads[name], grads["plain"])


def test_structural_loss_in_blocks_on_eight_devices():
  """Blocks over target rows of a batch sharded on 8 devices: same values and gradients."""
  rng = np.random.default_rng(1)
  sharding = parallel.data_sharding(parallel.make_mesh())
  ti = rng.normal(size=(32, 4, 8)).astype(np.float32)        # image regions: all real
  si = rng.normal(size=(32, 4, 8)).astype(np.float32)
  tc, tcm = _fragments(rng, 32, 6, 8)
  sc, scm = _fragments(rng, 32, 6, 8)
  args = jax.device_put((ti, tc, tcm, si, sc, scm), sharding)

  def loss(block_bytes, shards, ti, tc, tcm, si, sc, scm):
    return sum(losses.structural_loss(ti, tc, tcm, si, sc, scm, k=3, tau=1.0,
                                      block_bytes=block_bytes, shards=shards))

  row_bytes = 6 * 32 * 6 * 4      # one caption's [F1, Bs * F2] float32 cosines
  results = []
  for block_bytes, shards in ((0, 1), (row_bytes, 8), (3 * row_bytes, 8), (2 * row_bytes, 1)):
    f = jax.jit(jax.value_and_grad(functools.partial(loss, block_bytes, shards),
                                   argnums=(0, 1, 3, 4)))
    value, (g_ti, g_tc, g_si, g_sc) = jax.device_get(f(*args))
    # Padded words are zero vectors, whose gradient (never used) is ill-conditioned.
    results.append((value, g_ti, g_tc * tcm[..., None], g_si, g_sc * scm[..., None]))
  for other in results[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 other, results[0])


@pytest.fixture(scope="module")
def fp32():
  """The smoke config on a 1-device mesh: config, data, state, jitted float32 step, batch(i)."""
  config = smoke_config(**{"model.text_dropout": 0.0})
  data, model, discs, txs = _setup(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  init = jax.jit(lambda r: train.init_state(config, model, discs, txs, data, r),
                 out_shardings=parallel.replicated(mesh))
  state = init(jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(config, model, discs, txs))
  batch = lambda i: parallel.to_global(_host_batch(config, data, i), parallel.data_sharding(mesh))
  return config, state, step, batch


def test_bfloat16_encoders_step_close_to_float32(fp32):
  config, state, fp32_step, batch = fp32
  c = smoke_config(**{"model.text_dropout": 0.0, "model.compute_dtype": "bfloat16"})
  _, model, discs, txs = _setup(c)
  new_state, bf16 = jax.jit(train.make_train_step(c, model, discs, txs))(state, batch(0))
  _, f32 = fp32_step(state, batch(0))
  for leaf in jax.tree.leaves(new_state["params"]):
    assert leaf.dtype == jnp.float32
  assert float(bf16["nonfinite"]) == 0.0
  for key in ("loss/triplet", "loss/struct_img2cap", "loss/struct_cap2img", "loss/adv_image",
              "loss/adv_caption", "grad_norm/enc"):
    np.testing.assert_allclose(float(bf16[key]), float(f32[key]), rtol=3e-2, err_msg=key)


def test_remat_text_gives_the_same_gradients(fp32):
  config, state, _, batch = fp32
  captions = batch(0)["source"]
  grads = []
  for remat in (False, True):
    c = smoke_config(**{"model.remat_text": remat, "model.text_dropout": 0.3})
    _, model, _, _ = _setup(c)

    def f(params, model=model):
      frags, _ = model.apply({"params": params}, captions["captions"], captions["lengths"],
                             train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                             method=model.encode_captions)
      return (frags ** 2 * jnp.arange(frags.shape[-1])).sum()

    grads.append(jax.jit(jax.grad(f))(state["params"]["enc"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *grads)


def test_steps_make_no_implicit_transfers(fp32):
  """Batch transfer, steps and metric reads as the loop does them, under the transfer guard."""
  _, state, step, batch = fp32
  with jax.transfer_guard("disallow"):
    for i in range(3):
      state, metrics = step(state, batch(i))
    host_metrics, nonfinite = jax.device_get((metrics, state["nonfinite_steps"]))
  assert int(nonfinite) == 0 and np.isfinite(host_metrics["loss/encoder"])


def test_one_vs_eight_devices_reference_config():
  """The AECR reference config (SAF head, reference quirks) on 1 and 8 devices: the same
  losses and gradients (the optimizer update is elementwise).

  Parameters after Adam are not compared: SGRAF's attention biases have a gradient that is
  zero in exact arithmetic, and Adam turns its rounding noise into +-lr steps.
  """
  config = aecr_reference.get_config("smoke")
  with config.unlocked():
    config.model.text_dropout = 0.0
    config.model.head_dropout = 0.0
  data, model, discs, txs = _setup(config)
  loss_fn = train.make_loss_fn(config, model, discs)
  results = []
  for n in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:n])
    init = jax.jit(lambda r: train.init_state(config, model, discs, txs, data, r),
                   out_shardings=parallel.replicated(mesh))
    state = init(jax.random.PRNGKey(0))
    batch = parallel.to_global(_host_batch(config, data, 0), parallel.data_sharding(mesh))
    grads, (metrics, _) = jax.jit(jax.grad(loss_fn, has_aux=True))(
        state["params"], state["model_state"], batch, jax.random.PRNGKey(1))
    results.append(jax.device_get((grads, metrics)))
  (g1, m1), (g8, m8) = results
  for k in m1:
    np.testing.assert_allclose(m1[k], m8[k], rtol=2e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                       atol=1e-3 * np.abs(a).max() + 1e-7),
               g1, g8)


def test_pairwise_scores_same_on_one_and_eight_devices():
  """The SAF head's all-pairs scores, split over 8 devices, equal the 1-device scores."""
  from aeir_jax import config_lib, evaluate, train as train_lib
  from aeir_jax.data import load_data
  from configs import aecr_reference
  config = aecr_reference.get_config("smoke")
  data = load_data(config)
  model, discs = train_lib.build_models(config, data)
  txs = train_lib.build_optimizers(config)
  state = train_lib.init_state(config, model, discs, txs, data, jax.random.PRNGKey(0))
  variables = {"params": state["params"]["enc"], **state["model_state"]}
  split = config_lib.eval_splits(config, data)["target_test"]
  scores = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = parallel.make_mesh(devices)
    ev = evaluate.Evaluator(model, 12, parallel.data_sharding(mesh), parallel.replicated(mesh))
    scores.append(ev.scores(variables, split))
  assert scores[0].shape == (split.num_images, split.num_captions)
  np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5, atol=1e-6)
