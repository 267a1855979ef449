"""Reliability: bad input gives one clear line and exit code 2 without damaging a workdir;
non-finite steps are skipped or stop the run with the last good checkpoint intact; a run
killed at random moments resumes to the same result as an uninterrupted one."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from aeir_jax import train
from aeir_jax.tools import chaos
from test_train import smoke_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _launch(*args, env=None):
  cmd = [sys.executable, str(REPO / "launch.py"), *args]
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=full_env,
                        timeout=300)


def _tree_digest(path: pathlib.Path) -> dict:
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished smoke run whose files must survive every bad command below."""
  workdir = tmp_path_factory.mktemp("finished")
  result = _launch("--config", "configs/default.py:smoke", "--workdir", str(workdir))
  assert result.returncode == 0, result.stderr
  return workdir


def _assert_user_error(result, *needles):
  assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
  lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


BAD_CONFIGS = [
    # (overrides, words the message must contain)
    (["--config.loss.tua=1.0"], ["loss.tua", "tau"]),
    (["--config.model.similarity=dot"], ["model.similarity", "cosine"]),
    (["--config.loss.kl_reduction=avg"], ["loss.kl_reduction"]),
    (["--config.loss.disc_grad_mode=both"], ["loss.disc_grad_mode"]),
    (["--config.loss.k=40"], ["loss.k=40", "data.source_batch"]),
    (["--config.data.name=imagenet"], ["data.name", "synthetic"]),
]


@pytest.mark.parametrize("overrides,needles", BAD_CONFIGS)
def test_bad_config_is_one_line_exit_2(finished_run, overrides, needles):
  before = _tree_digest(finished_run)
  result = _launch("--config", "configs/default.py:smoke", "--workdir", str(finished_run),
                   *overrides)
  _assert_user_error(result, *needles)
  assert _tree_digest(finished_run) == before


def test_missing_config_file(tmp_path):
  result = _launch("--config", "configs/nope.py", "--workdir", str(tmp_path))
  _assert_user_error(result, "configs/nope.py")


def test_unknown_config_variant(tmp_path):
  result = _launch("--config", "configs/default.py:smoke,bogus", "--workdir", str(tmp_path))
  _assert_user_error(result, "bogus")


def test_batch_not_divisible_by_devices(tmp_path):
  result = _launch("--config", "configs/default.py:smoke", "--workdir", str(tmp_path),
                   "--config.data.source_batch=12",
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  _assert_user_error(result, "data.source_batch=12", "8 devices")


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  result = _launch("--config", "configs/default.py:smoke", "--workdir", str(blocker / "run"))
  _assert_user_error(result, "not writable", str(blocker / "run"))


def test_incompatible_checkpoint_names_fields(finished_run):
  before = _tree_digest(finished_run)
  result = _launch("--config", "configs/default.py:smoke", "--workdir", str(finished_run),
                   "--config.model.embed_dim=24", "--config.loss.tau=1.0")
  _assert_user_error(result, "model.embed_dim", "loss.tau", "different config")
  assert _tree_digest(finished_run) == before


def test_finished_run_relaunched_changes_nothing(finished_run):
  """Relaunching a finished run (e.g. a sweep retry) resumes at its end and keeps results."""
  results_before = json.loads((finished_run / "results.json").read_text())
  result = _launch("--config", "configs/default.py:smoke", "--workdir", str(finished_run))
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((finished_run / "results.json").read_text()) == results_before


class _NaNInjector:
  """Wraps `train.gather`: the source images of step `bad_step` become NaN."""

  def __init__(self, gather, bad_step):
    self.gather, self.bad_step, self.calls = gather, bad_step, 0

  def __call__(self, split, image_idx, caption_idx):
    out = self.gather(split, image_idx, caption_idx)
    # make_batch reads source then target for each step, in step order.
    if self.calls == 2 * self.bad_step:
      out["images"] = np.full_like(out["images"], np.nan)
    self.calls += 1
    return out


def _latest_state(workdir):
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  with ocp.StandardCheckpointer() as ckptr:
    return steps[-1], ckptr.restore(str(workdir / "checkpoints" / str(steps[-1]) / "state"))


def _events(workdir):
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [l for l in lines if l["kind"] == "event"]


def test_nan_features_skip_step(tmp_path, monkeypatch, one_device):
  monkeypatch.setattr(train, "gather", _NaNInjector(train.gather, bad_step=4))
  config = smoke_config(**{"train.num_steps": 8, "train.on_nonfinite": "skip"})
  results = train.run(config, str(tmp_path), devices=one_device)
  assert results["step"] == 8
  step, state = _latest_state(tmp_path)
  assert step == 8 and int(state["nonfinite_steps"]) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  assert [e["nonfinite_steps"] for e in _events(tmp_path)] == [1.0]


def test_nan_features_stop_keeps_good_checkpoint(tmp_path, monkeypatch, one_device):
  monkeypatch.setattr(train, "gather", _NaNInjector(train.gather, bad_step=4))
  config = smoke_config(**{"train.num_steps": 8, "train.on_nonfinite": "stop"})
  with pytest.raises(train.NumericalError, match="non-finite"):
    train.run(config, str(tmp_path), devices=one_device)
  step, state = _latest_state(tmp_path)
  assert step == 6  # stopped at the first log step after the bad step 5
  assert int(state["nonfinite_steps"]) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  assert not (tmp_path / "results.json").exists()


def test_chaos_kills_and_resumes(tmp_path):
  """A shortened chaos run: two random kills (SIGKILL/SIGTERM), then bit-identical results."""
  summary = chaos.run_chaos(
      "configs/default.py:smoke", str(tmp_path), kills=2,
      overrides=["--config.train.num_steps=24", "--config.train.checkpoint_every=4",
                 "--config.train.eval_every=12", "--config.train.log_every=4"],
      seed=3, verbose=False)
  assert summary["ok"], summary


# ----------------------------------------------------------------------------- bad data files

def _fake_scan_root(root):
  from aeir_jax.data.scan import write_fake_scan
  sizes = {"train": 40, "dev": 10, "test": 10, "testall": 10}
  for name in ("f30k_precomp", "coco_precomp"):
    write_fake_scan(str(root), name, sizes, regions=6, dim=32, seed=len(name))
  return root


def _break_missing(root):
  (root / "coco_precomp" / "train_caps.txt").unlink()


def _break_shape(root):
  np.save(root / "f30k_precomp" / "train_ims.npy", np.zeros((40, 32), np.float32))


def _break_dtype(root):
  np.save(root / "f30k_precomp" / "train_ims.npy", np.zeros((40, 6, 32), np.int32))


def _break_count(root):
  path = root / "f30k_precomp" / "train_caps.txt"
  path.write_text("".join(path.read_text().splitlines(keepends=True)[:-3]))


def _break_empty_line(root):
  path = root / "coco_precomp" / "train_caps.txt"
  lines = path.read_text().splitlines(keepends=True)
  lines[7] = "   \n"
  path.write_text("".join(lines))


def _break_utf8(root):
  path = root / "coco_precomp" / "train_caps.txt"
  lines = path.read_bytes().splitlines(keepends=True)
  lines[3] = b"a dog \xff\xfe on grass\n"
  path.write_bytes(b"".join(lines))


def _break_nan(root):
  ims = np.load(root / "f30k_precomp" / "train_ims.npy")
  ims[0, 0, 0] = np.nan
  np.save(root / "f30k_precomp" / "train_ims.npy", ims)


def _break_vocab(root):
  (root / "vocab.json").write_text(json.dumps(
      {"word2idx": {"a": 0, "dog": 1}, "idx2word": {"0": "a", "1": "dog"}, "idx": 2}))


BAD_DATA = [
    # (break, needles in the one-line message)
    (_break_missing, ["train_caps.txt"]),
    (_break_shape, ["train_ims.npy"]),
    (_break_dtype, ["train_ims.npy"]),
    (_break_count, ["train_caps.txt"]),
    (_break_empty_line, ["train_caps.txt:8"]),
    (_break_utf8, ["train_caps.txt:4", "UTF-8"]),
    (_break_nan, ["train_ims.npy"]),
    (_break_vocab, ["vocab.json", "<pad>"]),
]


SCAN_ARGS = ["--config", "configs/scan_transfer.py:smoke",
             "--config.data.scan.fake.train_images=0"]


def _scan_args(root, workdir):
  return [*SCAN_ARGS, "--workdir", str(workdir), f"--config.data.scan.root={root}",
          f"--config.data.scan.vocab_path={root / 'vocab.json'}"]


def _write_good_scan(root):
  import shutil
  from aeir_jax.data.vocab import Vocab
  shutil.rmtree(root, ignore_errors=True)
  _fake_scan_root(root)
  captions = (root / "f30k_precomp" / "train_caps.txt").read_text().splitlines()
  Vocab.build(captions, threshold=1).save(str(root / "vocab.json"))


@pytest.fixture(scope="module")
def scan_run(tmp_path_factory):
  """A finished run on good SCAN-format files; each test breaks them, then they are rewritten."""
  root = tmp_path_factory.mktemp("scan_data")
  workdir = tmp_path_factory.mktemp("scan_run")
  _write_good_scan(root)
  result = _launch(*_scan_args(root, workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  yield root, workdir


@pytest.mark.parametrize("breaker,needles", BAD_DATA, ids=[b.__name__ for b, _ in BAD_DATA])
def test_bad_data_is_one_line_exit_2(scan_run, breaker, needles):
  root, workdir = scan_run
  before = _tree_digest(workdir)
  breaker(root)
  try:
    result = _launch(*_scan_args(root, workdir))
  finally:
    _write_good_scan(root)
  _assert_user_error(result, *needles)
  assert _tree_digest(workdir) == before
