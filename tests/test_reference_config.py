"""The AECR reference config against docs/method.md, its stage-0 and clean siblings, and the smoke
run end to end: an SGRAF PyTorch checkpoint imported and used as the warm start of a run on a
generated SCAN-format dataset, evaluated with the named protocols, then re-evaluated by the
eval-only entry point."""

import collections
import json
import pathlib

import numpy as np
import pytest

from aeir_jax import checkpoints, config_lib, evaluate, parallel, train
from aeir_jax.data import load_data
from aeir_jax.errors import ConfigError
from aeir_jax.logging_lib import read_metrics
from aeir_jax.tools.import_torch import import_checkpoint
from configs import aecr_reference, scan_transfer, sgraf_source
from test_import_torch import save_torch_zip
from test_sgraf import random_head_state_dict

REPO = pathlib.Path(__file__).resolve().parents[1]


def _flat(node, prefix=""):
  """{dotted field: value} of a config."""
  out = {}
  for key, value in node.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def test_reference_values_match_method():
  """docs/method.md 6.3 and appendix B, field by field (F30K -> COCO)."""
  c = aecr_reference.get_config("")
  assert c.scenario == "f30k2coco" and c.variant == "aeir"
  assert c.data.name == "scan"
  assert (c.data.scan.source, c.data.scan.target) == ("f30k_precomp", "coco_precomp")
  assert c.data.scan.tokenize_bytes_repr_bug is True
  assert c.data.scan.fake.train_images == 0 and c.data.scan.vocab_threshold == 4
  assert (c.data.source_batch, c.data.target_batch) == (56, 56)
  assert (c.model.embed_dim, c.model.word_dim, c.model.sim_dim) == (1024, 300, 256)
  assert c.model.similarity == "saf" and c.model.sgr_steps == 3
  assert c.model.text_encoder == "gru"
  assert (c.model.text_dropout, c.model.head_dropout) == (0.4, 0.4)
  assert tuple(c.model.disc_hidden) == (512, 64)
  assert (c.model.disc_init, c.model.disc_init_std) == ("reference", 0.01)
  assert (c.loss.triplet_weight, c.loss.margin, c.loss.max_violation) == (1.0, 0.2, True)
  assert c.loss.triplet_reduction == "sum"
  assert (c.loss.adv_weight, c.loss.struct_weight) == (1.0, 1e-3)
  assert (c.loss.k, c.loss.tau) == (3, 3.0)
  assert (c.loss.kl_reduction, c.loss.detach_p, c.loss.frag_agg) == ("sum", False, "sum")
  assert c.loss.pad_zero_candidate is True
  assert c.loss.disc_pool_caption == "padded_mean"
  assert c.loss.disc_grad_mode == "reference"
  assert (c.optim.lr, c.optim.disc_lr) == (1e-4, 1e-4)
  assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.999, 1e-8)
  assert (c.optim.grad_clip, c.optim.clip_scope) == (2.0, "joint")
  steps_per_epoch = 10_115  # ceil(566,435 COCO train captions / 56)
  assert c.train.num_steps == 3 * steps_per_epoch
  assert c.optim.lr_decay_steps == 20 * steps_per_epoch and c.optim.lr_decay_factor == 0.1
  assert c.train.eval_every == steps_per_epoch
  assert tuple(c.eval.splits) == ("target_test",)
  assert tuple(c.eval.protocols.target_test) == ("coco_5fold1k", "coco_5k")
  assert c.train.init_from == ""
  config_lib.validate(c)


def test_reverse_scenario_and_args():
  c = aecr_reference.get_config("coco2f30k,seed=2,epochs=5")
  assert (c.data.scan.source, c.data.scan.target) == ("coco_precomp", "f30k_precomp")
  assert c.train.num_steps == 5 * 2590 and c.optim.lr_decay_steps == 20 * 2590
  assert tuple(c.eval.protocols.target_test) == ("f30k_1k",)
  assert c.seed == 2
  assert aecr_reference.get_config("source_only").loss.adv_weight == 0.0
  for bad in ("f30k2coco,coco2f30k", "coco2coco", "epochs=0"):
    with pytest.raises(ConfigError):
      aecr_reference.get_config(bad)


def test_clean_config_differs_only_in_quirk_switches():
  reference, clean = _flat(aecr_reference.get_config("")), _flat(scan_transfer.get_config(""))
  changed = {k for k in reference if reference[k] != clean[k]}
  assert changed == set(aecr_reference.CLEAN_SWITCHES)
  assert clean["loss.disc_grad_mode"] == "clean"
  assert clean["data.scan.tokenize_bytes_repr_bug"] is False


@pytest.mark.parametrize("scenario,epochs,decay,steps_per_epoch", [
    ("f30k2coco", 30, 20, 1133), ("coco2f30k", 20, 10, 4426)])
def test_stage0_is_sgraf_recipe(scenario, epochs, decay, steps_per_epoch):
  c = sgraf_source.get_config(scenario)
  assert c.data.source_batch == 128 and c.loss.adv_weight == 0 and c.loss.struct_weight == 0
  assert c.optim.lr == 2e-4 and c.optim.grad_clip == 2.0 and c.optim.clip_scope == "per_group"
  assert c.train.num_steps == epochs * steps_per_epoch
  assert c.optim.lr_decay_steps == decay * steps_per_epoch
  assert tuple(c.eval.splits) == ("source_test",)
  reference = aecr_reference.get_config(scenario)
  for field in ("embed_dim", "word_dim", "sim_dim", "similarity", "text_dropout"):
    assert c.model[field] == reference.model[field]
  assert c.data.scan.to_dict() == reference.data.scan.to_dict()
  assert sgraf_source.get_config(f"{scenario},clean").data.scan.tokenize_bytes_repr_bug is False


def test_sweeps_are_declared():
  assert len(aecr_reference.sweep("")) == 15
  quirks = aecr_reference.sweep("quirks")
  assert {"loss.disc_grad_mode": "clean", "name": "loss.disc_grad_mode=clean",
          "arg": "seed=0"} in quirks
  assert len(scan_transfer.sweep("k")) == 12


def _sgraf_state_dicts(rng, vocab, img_dim, embed, word_dim, sim, regions):
  """SGRAF `[image encoder, text encoder, similarity head]` state dicts, reference names."""
  u = lambda *shape: rng.uniform(-0.3, 0.3, shape).astype(np.float32)
  image = collections.OrderedDict({"fc.weight": u(embed, img_dim), "fc.bias": u(embed)})
  text = collections.OrderedDict({"embed.weight": u(vocab, word_dim)})
  for suffix in ("", "_reverse"):
    text.update({f"cap_rnn.weight_ih_l0{suffix}": u(3 * embed, word_dim),
                 f"cap_rnn.weight_hh_l0{suffix}": u(3 * embed, embed),
                 f"cap_rnn.bias_ih_l0{suffix}": u(3 * embed),
                 f"cap_rnn.bias_hh_l0{suffix}": u(3 * embed)})
  head = random_head_state_dict(rng, "saf", embed=embed, sim=sim, regions=regions)
  return [image, text, collections.OrderedDict(head)]


def _smoke_config(**fields):
  return config_lib.override(aecr_reference.get_config("smoke"), fields)


def test_smoke_run_from_imported_sgraf(tmp_path, one_device):
  config = _smoke_config(**{"train.num_steps": 2, "train.eval_every": 2,
                            "train.checkpoint_every": 2})
  data = load_data(config)
  fake, m = config.data.scan.fake, config.model
  sds = _sgraf_state_dicts(np.random.default_rng(0), data.vocab_size, fake.dim, m.embed_dim,
                           m.word_dim, m.sim_dim, fake.regions)
  save_torch_zip({"epoch": 30, "model": sds, "best_rsum": 0.0}, tmp_path / "sgraf.pth.tar")
  imported = tmp_path / "imported"
  import_checkpoint(str(tmp_path / "sgraf.pth.tar"), str(imported), "sgraf")

  with config.unlocked():
    config.train.init_from = str(imported)
  workdir = tmp_path / "run"
  results = train.run(config, str(workdir), devices=one_device)

  # Named protocols replace the split's own keys.
  for prefix in ("coco_5fold1k", "coco_5k"):
    assert {f"{prefix}/{m}" for m in ("i2t_r1", "t2i_r10", "rsum")} <= set(results)
  assert not any(k.startswith("target_test/") for k in results)
  assert results["step"] == config.train.num_steps

  # The run started from the imported weights: the step-0 embeddings are theirs.
  loaded = checkpoints.load_params(str(imported))
  model, _ = train.build_models(config, data)
  mesh = parallel.make_mesh(one_device)
  evaluator = evaluate.Evaluator(model, 32, parallel.data_sharding(mesh),
                                 parallel.replicated(mesh))
  variables = {"params": loaded["params"], "batch_stats": loaded["batch_stats"]}
  start = np.load(workdir / "embeddings" / "step_0.npz")
  image, caption = evaluate.pooled_embeddings(evaluator, variables, data.target.test, 200)
  np.testing.assert_allclose(start["image_target"], image, atol=1e-5)
  np.testing.assert_allclose(start["caption_target"], caption, atol=1e-5)
  step0 = next(r for r in read_metrics(str(workdir), "eval") if r["step"] == 0)
  expected = evaluator.evaluate(variables, data.target.test, "target_test",
                                protocols=config.eval.protocols.target_test)
  assert {k: step0[k] for k in expected} == pytest.approx(expected, abs=1e-6)

  # The eval-only entry point on the finished run gives the run's final metrics.
  out = tmp_path / "eval_only"
  code = evaluate.main(["evaluate", f"--config={REPO / 'configs/aecr_reference.py'}:smoke",
                        f"--init_from={workdir}", f"--workdir={out}"])
  assert code == 0
  again = json.loads((out / "results.json").read_text())
  assert again["variant"] == "no_adaptation"
  for key, value in results.items():
    if "/" in key:
      assert again[key] == pytest.approx(value, abs=1e-6), key


def test_eval_only_errors_exit_2(tmp_path, capsys):
  config = f"--config={REPO / 'configs/aecr_reference.py'}:smoke"
  assert evaluate.main(["evaluate", config]) == 2
  assert "nothing to evaluate" in capsys.readouterr().err
  assert evaluate.main(["evaluate", config, f"--init_from={tmp_path / 'missing'}"]) == 2
  assert "does not exist" in capsys.readouterr().err
