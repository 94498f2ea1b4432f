"""train.py / eval.py as the user runs them (subprocesses): kill -9 resume, multi-process,
load_pretrained / eval.py on a workdir, a non-finite loss, and bad input.

One reference run (1 process, 4 CPU devices, 6 demo steps at batch 8, float32 compute so that
the two-process comparison is not blurred by bf16 rounding of differently ordered sums) is shared;
every run uses the same shapes and a session-wide persistent compilation cache, so only the first run and the
two-process run compile the model. XLA's backend optimization is off in these runs (it cuts the
compile time about threefold; every run here uses the same flags, so comparisons stay exact).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.imagenet_fixture import make_imagenet_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
TINY = ["--config=configs/demo.py", "--config.global_batch_size=8", "--config.eval_batch_size=120",
        "--config.model.dtype=float32",
        f"--config.max_steps={STEPS}", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=2"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def env(cache_dir: str, devices: int = 4) -> dict:
  return {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                       "--xla_backend_optimization_level=0",
          "JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def start(script: str, args: list[str], cache_dir: str, devices: int = 4) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env(cache_dir, devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(script: str, args: list[str], cache_dir: str, devices: int = 4, timeout: float = 900):
  proc = start(script, args, cache_dir, devices)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def losses(workdir) -> list[float]:
  return [r["train_loss"] for r in metrics(workdir)]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir):
  """An uninterrupted 6-step run: 1 process x 4 devices."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  rc, _, err = run("train.py", TINY + [f"--workdir={workdir}"], cache_dir)
  assert rc == 0, err[-3000:]
  return workdir


def test_reference_run_writes_metrics_checkpoints_and_plot(reference):
  records = metrics(reference)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert all({"step", "epoch", "train_loss", "lr"} <= r.keys() for r in records)
  assert {"val_top1", "val_top5", "val_loss", "ema_val_top1"} <= records[-1].keys()
  assert all(np.isfinite(losses(reference)))
  assert os.path.exists(os.path.join(reference, "curves.png"))
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(reference, "tensorboard")))
  steps = sorted(int(d) for d in os.listdir(reference) if d.isdigit())
  assert steps == [4, 6]  # keep_checkpoints=2


def test_load_pretrained_and_eval_py_on_a_workdir(reference, cache_dir):
  import fec_jax
  model, variables = fec_jax.load_pretrained(reference)
  _, ema = fec_jax.load_pretrained(reference, ema=True)
  assert model.num_classes == 10
  leaf = lambda v: np.asarray(v["params"]["head"]["kernel"])
  assert not np.array_equal(leaf(variables), leaf(ema))  # two different weight sets
  rc, out, err = run("eval.py", ["--config=configs/demo.py", "--config.eval_batch_size=120",
                                 "--config.model.dtype=float32", f"--workdir={reference}"],
                     cache_dir)
  assert rc == 0, err[-3000:]
  top1 = float(out.split("top-1 ")[1].split("%")[0])
  assert top1 == pytest.approx(metrics(reference)[-1]["val_top1"], abs=0.01)


def test_kill9_then_rerun_gives_the_same_losses(cache_dir, tmp_path):
  """On one CPU device (no cross-device all-reduce, whose summation order on CPU can vary from
  run to run in the last bit) the resumed run must equal the uninterrupted one bit for bit."""
  straight = str(tmp_path / "straight")
  rc, _, err = run("train.py", TINY + [f"--workdir={straight}"], cache_dir, devices=1)
  assert rc == 0, err[-3000:]
  workdir = str(tmp_path / "killed")
  proc = start("train.py", TINY + [f"--workdir={workdir}"], cache_dir, devices=1)
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 900
  while time.time() < deadline and proc.poll() is None:
    # Kill once step 2's checkpoint is committed and step 4's is being written.
    if (os.path.isdir(os.path.join(workdir, "2")) and os.path.exists(path)
        and len(open(path).readlines()) >= 4):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  rc, _, err = run("train.py", TINY + [f"--workdir={workdir}"], cache_dir, devices=1)
  assert rc == 0, err[-3000:]
  assert "resumed at step" in err  # it did resume, not start over
  resumed_at = int(err.split("resumed at step ")[1].split()[0])
  assert resumed_at in (2, 4)
  assert losses(workdir) == losses(straight)  # bit-identical
  assert metrics(workdir)[-1]["val_top1"] == metrics(straight)[-1]["val_top1"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(reference, cache_dir, tmp_path):
  """2 processes x 2 CPU devices (gloo) = 1 process x 4 devices, for 3 demo steps."""
  workdir = str(tmp_path / "multi")
  common = TINY + [f"--workdir={workdir}", "--config.max_steps=3", "--multihost",
                   f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
  procs = [start("train.py", common + [f"--process_id={i}"], cache_dir, devices=2)
           for i in range(2)]
  results = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  assert "on 4 devices (2 processes)" in results[0][1]
  # The same examples form each global batch; only their order across devices differs, so the
  # means differ by float summation order at most.
  np.testing.assert_allclose(losses(workdir), losses(reference)[:3], rtol=1e-5)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(reference, cache_dir, tmp_path):
  workdir = str(tmp_path / "diverged")
  shutil.copytree(reference, workdir)
  # Resume at step 6 with std 0: the images become infinite and so does the next loss.
  rc, _, err = run("train.py", TINY + [f"--workdir={workdir}", "--config.max_steps=8",
                                       "--config.data.std=(0.0, 0.0, 0.0)"], cache_dir)
  assert rc != 0
  assert "non-finite training loss" in err and "at step 7" in err
  assert "last good checkpoint is step 6" in err
  assert sorted(int(d) for d in os.listdir(workdir) if d.isdigit()) == [4, 6]


@pytest.mark.parametrize("case", ["missing", "empty", "num_classes", "image_size", "typo"])
def test_bad_input_fails_at_once_with_one_message(case, tmp_path, cache_dir):
  root = tmp_path / "data"
  args = {"missing": [f"--config.data.root={root}"],
          "empty": [f"--config.data.root={root}"],
          "num_classes": [f"--config.data.root={root}"],  # 3 class folders, config says 1000
          "image_size": ["--config.data.image_size=200"],
          "typo": ["--config.base_lrr=1e-3"]}[case]
  if case == "empty":
    root.mkdir()
  if case == "num_classes":
    make_imagenet_folder(root, num_classes=3, per_class=1, val_per_class=1)
  rc, out, err = run("train.py", ["--config=configs/fec_small.py", f"--workdir={tmp_path / 'w'}",
                                  *args], cache_dir, devices=1, timeout=300)
  assert rc != 0
  expected = {"missing": "expected the ImageNet folder layout",
              "empty": "expected the ImageNet folder layout",
              "num_classes": "num_classes is 1000", "image_size": "multiple of 32",
              "typo": "base_lrr"}[case]
  assert expected in err
  if case != "typo":  # config_flags reports a typo with absl's own usage message
    assert "Traceback" not in err
  assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")  # nothing was trained
