"""The HTML report: a real smoke run rendered, every plot embedded and decodable, the page
loaded in headless Chromium (images decoded, no console errors), unfinished runs, image
thumbnails, sweep folders and CLI errors."""

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from aeir_jax import report, sweep, train
from configs import default as default_config

PLOTS = {"losses", "disc_accuracy", "rsum", "alignment_image", "alignment_caption"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke") / "run"
  train.run(default_config.get_config("smoke"), str(workdir), devices=jax.devices()[:1])
  return workdir


def _copy_run(run_dir, dest):
  shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoints", "tb", "report*"))
  return dest


def _data_uris(page):
  return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


def _assert_self_contained(page):
  refs = re.findall(r'(?:src|href)="([^"]*)"', page)
  assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs[:3]
  assert "<script" not in page and "<link" not in page and "url(" not in page


def test_run_report_embeds_every_plot(run_dir, tmp_path):
  out = report.render(str(run_dir), str(tmp_path / "report.html"))
  page = open(out, encoding="utf-8").read()
  _assert_self_contained(page)
  pngs = {p[:-4] for p in os.listdir(tmp_path / "report")}
  assert pngs == PLOTS
  embedded = set(_data_uris(page))
  for name in PLOTS:
    data = (tmp_path / "report" / f"{name}.png").read_bytes()
    assert base64.b64encode(data).decode() in embedded, name
    with Image.open(tmp_path / "report" / f"{name}.png") as im:
      im.load()
      assert im.format == "PNG" and min(im.size) > 100
  results = json.loads((run_dir / "results.json").read_text())
  assert f"<td>{results['target_test/rsum']:.1f}</td>" in page
  assert "Not finished" not in page and "query sentence" in page and "✓" in page
  # The default output lies in the workdir, plots in WORKDIR/report/.
  assert report.render(str(run_dir)) == os.path.join(str(run_dir), "report.html")
  assert {p[:-4] for p in os.listdir(run_dir / "report")} == PLOTS


def test_pca_2d_finds_the_main_axes():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 6)) * np.array([5.0, 0.1, 2.0, 0.1, 0.1, 0.1])
  points, ratio = report.pca_2d(x)
  assert points.shape == (500, 2) and ratio[0] > ratio[1] > 0.1
  np.testing.assert_allclose(np.abs(np.corrcoef(points[:, 0], x[:, 0])[0, 1]), 1, atol=1e-2)
  np.testing.assert_allclose(np.abs(np.corrcoef(points[:, 1], x[:, 2])[0, 1]), 1, atol=1e-2)


def test_unfinished_run_says_so(run_dir, tmp_path):
  """A run killed after its last evaluation: no results.json, retrieval examples or later
  embedding snapshots."""
  workdir = _copy_run(run_dir, tmp_path / "run")
  (workdir / "results.json").unlink()
  shutil.rmtree(workdir / "retrieval")
  for npz in (workdir / "embeddings").glob("step_*.npz"):
    if npz.name != "step_0.npz":
      npz.unlink()
  steps = json.loads((workdir / "config.json").read_text())["train"]["num_steps"]
  page = open(report.render(str(workdir)), encoding="utf-8").read()
  assert "Not finished" in page and f"last logged step {steps} of {steps}" in page
  assert f"the latest evaluation (step {steps})" in page
  assert "Only one embedding snapshot (step 0)" in page
  assert "No retrieval/&lt;split&gt;.json yet" in page
  assert len(_data_uris(page)) == len(PLOTS)


def _with_image_files(run_dir, tmp_path):
  """A copy of the run whose target retrieval examples name image files in a folder."""
  workdir = _copy_run(run_dir, tmp_path / "run")
  images = tmp_path / "images"
  images.mkdir()
  path = workdir / "retrieval" / "target_test.json"
  examples = json.loads(path.read_text())
  ids = set()
  for direction in ("text_to_image", "image_to_text"):
    for q in examples[direction]:
      for item in [q] + q["results"]:
        if "image_id" in item:
          item["image_id"] += ".jpg"
          ids.add(item["image_id"])
  for i, name in enumerate(sorted(ids)):
    Image.new("RGB", (320, 240), (20 * i % 256, 90, 200)).save(images / name)
  path.write_text(json.dumps(examples))
  return workdir, images, ids


def test_thumbnails_when_image_ids_are_files(run_dir, tmp_path):
  workdir, images, ids = _with_image_files(run_dir, tmp_path)
  page = open(report.render(str(workdir), image_dirs=[str(images)]), encoding="utf-8").read()
  thumbs = _data_uris(page)[len(PLOTS):]
  assert len(set(thumbs)) == len(ids)
  with Image.open(io.BytesIO(base64.b64decode(thumbs[0]))) as im:
    assert max(im.size) == report.THUMBNAIL_SIZE
  # Without the folder the ids are shown as text.
  page = open(report.render(str(workdir)), encoding="utf-8").read()
  assert len(_data_uris(page)) == len(PLOTS) and "target_test_0.jpg" in page


def _results(root, rel, variant, seed, rsum):
  (root / rel).mkdir(parents=True, exist_ok=True)
  (root / rel / "results.json").write_text(json.dumps(
      {"variant": variant, "seed": seed, "step": 10, "target_test/rsum": rsum,
       "target_test/i2t_r1": rsum / 10, "target_test/t2i_medr": 1000 / rsum}))


def test_sweep_report_reads_sweep_collect(tmp_path):
  root = tmp_path / "sweep"
  points = sweep.expand(sweep.transfer_ablation(seeds=(0, 1)))
  sweep.write_sweep_file(str(root), points, {"config": "configs/default.py", "arg": "smoke",
                                             "sweep": ""})
  rsums = {"aeir": (300.0, 310.0), "structural_only": (280.0, None),
           "semantic_only": (270.0, 290.0), "source_only": (250.0, 250.0),
           "oracle": (500.0, 520.0)}
  for p in points:
    variant = p.arg.split(",")[0]
    rsum = rsums[variant][p.seed]
    if rsum is not None:
      _results(root, p.dir, variant, p.seed, rsum)
  page = open(report.render(str(root)), encoding="utf-8").read()
  _assert_self_contained(page)
  assert "<b>305.0 ± 7.1</b>" in page and "<td>280.0</td>" in page and "<td>1/2</td>" in page
  assert "510.0 ± 14.1" in page and "<b>510.0" not in page and "(reference)" in page
  assert "<b>3.3 ± 0.1</b>" in page  # medr: lower is better
  assert "1 run(s) have no results.json yet" in page and '<td class="l">new</td>' in page
  assert [p[:-4] for p in os.listdir(root / "report")] == ["sweep_rsum"]
  assert base64.b64encode((root / "report" / "sweep_rsum.png").read_bytes()).decode() in page


def test_sweep_report_from_a_folder_of_runs(tmp_path):
  root = tmp_path / "runs"
  for variant, seed, rsum in (("aeir", 0, 300.0), ("aeir", 1, 310.0),
                              ("source_only", 0, 250.0), ("source_only", 1, None)):
    folder = root / f"{variant}_{seed}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"variant": variant, "seed": seed,
         "loss": {"adv_weight": 0.0 if variant == "source_only" else 1.0, "k": 3}}))
    if rsum is not None:
      _results(root, folder.name, variant, seed, rsum)
  data = report.collect_runs(str(root))
  assert [(g["label"], g["n"], g["n_planned"]) for g in data["groups"]] == [
      ("aeir", 2, 2), ("source_only", 1, 2)]
  page = open(report.render(str(root)), encoding="utf-8").read()
  assert "<b>305.0 ± 7.1</b>" in page and "<td>250.0</td>" in page
  assert "No sweep.json" in page and '<td class="l">new</td>' in page


@pytest.mark.parametrize("argv_fn, expect", [
    (lambda d: [str(d / "missing")], "is not a folder"),
    (lambda d: [str(d)], "holds no run"),
    (lambda d: [str(d), "--out", str(d / "r.txt")], "must end in .html"),
    (lambda d: [str(d), "--images", str(d / "nope")], "--images"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv_fn, expect):
  assert report.main(argv_fn(tmp_path)) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and expect in err and "\n" not in err


def test_cli_usage_error_is_one_line_exit_2(capsys):
  with pytest.raises(SystemExit) as e:
    report.main([])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: the following arguments are required") and "\n" not in err


# ----------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def chromium():
  """(browser, chromedriver) paths, or a skip when either is not installed."""
  browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                   "google-chrome"))), None)
  driver = shutil.which("chromedriver")
  if not browser or not driver:
    pytest.skip("headless Chromium check needs chromium and chromedriver on PATH "
                "(Debian: apt-get install chromium chromium-driver)")
  return browser, driver


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _WebDriver:
  """The few W3C WebDriver commands the check needs, over chromedriver's HTTP API."""

  def __init__(self, browser, driver, profile):
    self.port = _free_port()
    self.proc = subprocess.Popen([driver, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while True:
      try:
        if self._call("GET", "/status")["ready"]:
          break
      except (urllib.error.URLError, ConnectionError):
        pass
      if time.time() > deadline:
        self.proc.kill()
        pytest.fail("chromedriver did not become ready within 20 s")
      time.sleep(0.1)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={profile}", "--window-size=1280,2000"]
    caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": browser, "args": args}}
    try:
      self.session = self._call("POST", "/session",
                                {"capabilities": {"alwaysMatch": caps}})["sessionId"]
    except Exception:
      self.proc.kill()
      raise

  def _call(self, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                 method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
      return json.load(resp)["value"]

  def cmd(self, method, path, body=None):
    return self._call(method, f"/session/{self.session}{path}", body)

  def load(self, path):
    """Opens a local file; returns (per-<img> [complete, naturalWidth], console entries)."""
    self.cmd("POST", "/url", {"url": f"file://{path}"})
    images = self.cmd("POST", "/execute/sync", {
        "script": "return [document.readyState, Array.from(document.images).map("
                  "i => [i.complete, i.naturalWidth])];", "args": []})
    logs = self.cmd("POST", "/se/log", {"type": "browser"})
    return images, logs

  def close(self):
    try:
      self.cmd("DELETE", "")
    finally:
      self.proc.terminate()
      self.proc.wait(timeout=20)


def test_report_loads_in_headless_chromium(chromium, run_dir, tmp_path):
  browser, driver = chromium
  workdir, images, _ = _with_image_files(run_dir, tmp_path)
  out = report.render(str(workdir), image_dirs=[str(images)])
  n_img = open(out, encoding="utf-8").read().count("<img ")
  probe = tmp_path / "probe.html"
  probe.write_text('<html><body><img src="data:image/png;base64,AAAA">'
                   '<script>console.error("probe")</script></body></html>')
  wd = _WebDriver(browser, driver, tmp_path / "profile")
  try:
    (_, probe_imgs), probe_logs = wd.load(str(probe))
    (state, imgs), logs = wd.load(out)
  finally:
    wd.close()
  # The probe shows the check can fail: a broken image and a console error are both seen.
  assert probe_imgs == [[True, 0]] and any("probe" in e["message"] for e in probe_logs)
  assert state == "complete" and len(imgs) == n_img > len(PLOTS)
  assert all(complete and width > 0 for complete, width in imgs), imgs
  assert [e for e in logs if e["level"] == "SEVERE"] == []
