"""train.py / eval.py as the user runs them (subprocesses): SIGTERM and kill -9 then the same
command again, two processes against one (and a SIGTERM to one of them), train.py and eval.py on
a workdir without --config, and one-line errors.

The runs use the tiny demo config of tests/train_fixture.py, XLA's backend optimization off (as
the in-process runs) and the session's persistent compilation cache; the in-process `reference`
run (tests/conftest.py) is what they are compared with.
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

from fec_jax import reporting
from tests.ade20k_fixture import make_ade20k_folder
from tests.train_fixture import STEPS, losses, saved_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config=configs/demo.py",
    "--config.global_batch_size=8",
    "--config.eval_batch_size=120",
    "--config.model.dtype=float32",
    f"--config.max_steps={STEPS}",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
    "--config.keep_checkpoints=2",
]


def env(cache_dir: str | None, devices: int) -> dict:
  """cache_dir None: no JAX_COMPILATION_CACHE_DIR, train.py's own choice."""
  variables = {
      **os.environ,
      "PYTHONPATH": REPO,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
      "--xla_backend_optimization_level=0",
      "JAX_COMPILATION_CACHE_DIR": cache_dir,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
  return {k: v for k, v in variables.items() if v is not None}


def start(
    script: str, args: list[str], cache_dir: str | None, devices: int = 1, cwd: str = REPO
) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, os.path.join(REPO, script), *args],
      cwd=cwd,
      env=env(cache_dir, devices),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def run(
    script: str,
    args: list[str],
    cache_dir: str | None,
    devices: int = 1,
    timeout: float = 900,
    cwd: str = REPO,
):
  proc = start(script, args, cache_dir, devices, cwd)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def interrupt(proc: subprocess.Popen, workdir: str, records: int, sig) -> str:
  """Sends `sig` once the run's metrics.jsonl has `records` lines; returns its stderr."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 900
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and len(open(path).readlines()) >= records:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be interrupted"
  proc.send_signal(sig)
  return proc.communicate(timeout=300)[1]


def test_sigterm_then_kill9_then_the_same_command_gives_the_reference_losses(
    reference, compilation_cache, tmp_path
):
  """On one CPU device (no cross-device all-reduce, whose summation order on CPU can vary from
  run to run in the last bit) the twice interrupted run equals the uninterrupted one bit for bit."""
  workdir = str(tmp_path / "interrupted")
  args = TINY + [f"--workdir={workdir}"]
  err = interrupt(start("train.py", args, compilation_cache), workdir, 2, signal.SIGTERM)
  assert "SIGTERM received" in err and "run the same command to resume" in err, err[-3000:]
  stopped = int(err.split("stopped at step ")[1].split(";")[0])
  assert saved_steps(workdir)[-1] == stopped < STEPS
  proc = start("train.py", args, compilation_cache)
  # kill -9 once the resumed run has written a record past the checkpoint it resumed from.
  interrupt(proc, workdir, stopped + 1, signal.SIGKILL)
  assert proc.returncode == -signal.SIGKILL
  rc, _, err = run("train.py", args, compilation_cache)
  assert rc == 0, err[-3000:]
  assert "resumed at step" in err  # it did resume, not start over
  assert losses(workdir) == losses(reference)  # bit-identical
  assert (
      reporting.read_metrics(workdir)[-1]["val_top1"]
      == reporting.read_metrics(reference)[-1]["val_top1"]
  )


def test_the_same_command_again_loads_the_compiled_steps_from_the_workdir(tmp_path, monkeypatch):
  """train.py keeps JAX's persistent compilation cache in the workdir: resuming compiles neither
  the train step nor the eval step again, in a moved workdir too (JAX logs each cache hit and miss
  at debug level). The moved workdir's resume is the harder case of the two (other paths), so it
  stands for both."""
  monkeypatch.setenv("JAX_DEBUG_LOG_MODULES", "jax._src.compiler")
  workdir = tmp_path / "w"
  args = TINY + [f"--workdir={workdir}", "--config.eval_every_steps=2", "--config.max_steps=2"]
  rc, _, err = run("train.py", args, None)
  assert rc == 0, err[-3000:]
  for step in ("jit_train_step", "jit_eval_step"):
    assert f"PERSISTENT COMPILATION CACHE MISS for '{step}'" in err, err[-3000:]
  assert os.listdir(workdir / "compilation_cache")
  moved = shutil.move(workdir, tmp_path / "moved")  # its cache goes with it
  args = TINY + [f"--workdir={moved}", "--config.eval_every_steps=2", "--config.max_steps=4"]
  rc, _, err = run("train.py", args, None)
  assert rc == 0 and "resumed at step 2" in err, err[-3000:]
  for step in ("jit_train_step", "jit_eval_step"):
    assert f"Persistent compilation cache hit for '{step}'" in err, err[-3000:]
  assert "MISS for 'jit_train_step'" not in err and "MISS for 'jit_eval_step'" not in err


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def moved_data_run(reference, workdir, root) -> None:
  """A copy of the reference run in `workdir` whose config.json reads class folders at `root`,
  which is not there (the data moved)."""
  saved = reporting.read_config(str(shutil.copytree(reference, workdir)))
  saved["data"]["source"], saved["data"]["root"] = "folder", str(root)
  (workdir / reporting.CONFIG_FILE).write_text(json.dumps(saved))


def test_train_py_without_config_on_a_new_workdir_says_it_trains_the_demo(tmp_path):
  """Without --config and a run to resume, the config is configs/demo.py: fine-tuning overrides
  without --config=configs/finetune.py trained the demo's recipe, or failed with an error about
  the demo's data alone. A note says so first."""
  workdir = tmp_path / "w"
  rc, _, err = run("train.py", [f"--workdir={workdir}", f"--config.data.root={tmp_path}"], None)
  assert (rc, err) == (
      2,
      f"note: no --config, and --workdir {workdir} holds no run to resume: training "
      "configs/demo.py (the digits demo; to fine-tune, --config=configs/finetune.py)\n"
      f"error: config.data: root '{tmp_path}' is read by source 'folder' only, and source is "
      "'demo': give --config.data.source=folder to read that folder, or --config.data.root=''\n",
  )
  assert not workdir.exists()


def test_train_py_without_config_on_a_file_as_workdir_is_the_error_alone(tmp_path):
  """A file given as --workdir (or in its path) is one error line: no note that the demo trains
  first, nor JAX's warning about a compilation cache under it."""
  (tmp_path / "notes.txt").write_text("mine")
  for workdir in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
    rc, _, err = run("train.py", [f"--workdir={workdir}"], None)
    assert (rc, err) == (
        2,
        f"error: --workdir {workdir}: {tmp_path}/notes.txt is a file; expected a directory\n",
    )


def test_train_py_on_a_workdir_without_config_resumes_it_with_its_config(
    reference, compilation_cache, tmp_path
):
  """The default --config is the run's own (configs/workdir.py reads its config.json); the demo
  config, the default elsewhere, differs from the run in its batch size, dtype and length."""
  workdir = shutil.copytree(reference, tmp_path / "copy")
  rc, _, err = run("train.py", [f"--workdir={workdir}"], compilation_cache, cwd=tmp_path)
  assert rc == 0, err[-3000:]
  assert f"resumed at step {STEPS}" in err and "nothing to train" in err, err[-3000:]
  moved_data_run(reference, tmp_path / "moved", tmp_path / "data")
  rc, _, err = run("train.py", [f"--workdir={tmp_path / 'moved'}"], compilation_cache)
  assert rc == 2 and err.startswith(f"error: config.data.root {tmp_path / 'data'} (the run's"), err
  (workdir / reporting.CONFIG_FILE).unlink()  # a run of an earlier fec-jax: the demo's is not its
  rc, _, err = run("train.py", [f"--workdir={workdir}"], compilation_cache, cwd=tmp_path)
  assert rc == 2 and err.startswith(f"error: --workdir {workdir} has no config.json"), err
  for item in ("opt_state", "progress", "data_iterator"):  # weights only, as the converter's
    shutil.rmtree(workdir / str(saved_steps(workdir)[-1]) / item)
  rc, _, err = run("train.py", [f"--workdir={workdir}"], compilation_cache, cwd=tmp_path)
  assert rc == 2 and err.startswith(f"error: {workdir} holds weights (step {STEPS}"), err
  assert err.rstrip().endswith(f"use a new --workdir with --config.init_from={workdir}"), err


def assert_both_stop_with(
    common: list[str], extras: list[list[str]], cache_dir: str, error: str
) -> None:
  """Starts train.py as processes 0 and 1 of a two-process run (the common flags, then each one's
  extras): both must exit with status 2 and the same last line, `error`."""
  procs = [
      start("train.py", common + [f"--process_id={i}", *extra], cache_dir)
      for i, extra in enumerate(extras)
  ]
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [2, 2], errs
  for err in errs:
    assert err.splitlines()[-1] == error, err


def test_processes_started_with_different_configs_stop_at_once(compilation_cache, tmp_path):
  """A process with its own override would train with other values than process 0 logs, one
  with its own workdir would fail inside Orbax: both processes name what differs."""
  common = TINY + [
      "--multihost",
      f"--coordinator_address=127.0.0.1:{free_port()}",
      "--num_processes=2",
  ]
  assert_both_stop_with(
      common,
      [
          [f"--workdir={tmp_path / 'multi'}"],
          [f"--workdir={tmp_path / 'other'}", "--config.base_lr=0.05"],
      ],
      compilation_cache,
      "error: process 1 was given another workdir, config.base_lr than process 0: give every "
      "process the same workdir and config (train.py: the same --workdir, --config and "
      "--config.* overrides)",
  )
  assert not os.path.exists(tmp_path / "multi") and not os.path.exists(tmp_path / "other")


def test_processes_stop_together_at_a_val_split_they_cannot_read(compilation_cache, tmp_path):
  """A segmentation run reads its first val records at its start (Task.check_eval_data, with a
  gather): where none can be read, both processes stop there, before the compile, with the
  first file's error, instead of at the first evaluation."""
  root = make_ade20k_folder(tmp_path / "ade", 4, 2, num_classes=4, sizes=((32, 32),))  # ids 0..4
  for path in sorted((tmp_path / "ade" / "annotations" / "validation").iterdir()):
    path.write_bytes(b"")
  common = [
      "--config=configs/demo_seg.py",
      "--config.data.source=ade20k",
      f"--config.data.root={root}",
      "--config.data.num_classes=5",
      "--config.global_batch_size=4",
      "--config.max_steps=2",  # without the check: 2 steps, then the evaluation's error
      f"--workdir={tmp_path / 'multi'}",
      "--multihost",
      f"--coordinator_address=127.0.0.1:{free_port()}",
      "--num_processes=2",
  ]
  assert_both_stop_with(
      common,
      [[], []],
      compilation_cache,
      f"error: the val split of {root} has no readable record in its 2 records (read at the "
      "start of training, not at its first evaluation hours in); the first: "
      "images/validation/ADE_val_00000001.jpg: annotation "
      "annotations/validation/ADE_val_00000001.png: empty file",
  )
  assert not os.path.exists(tmp_path / "multi")


def test_a_process_given_another_num_processes_stops_every_process(compilation_cache, tmp_path):
  """Only process 0 (the coordinator) reads --num_processes: process 1 given 3 would join a run
  of 2 all the same. Both processes name the mismatch."""
  common = TINY + [
      f"--workdir={tmp_path / 'multi'}",
      "--multihost",
      f"--coordinator_address=127.0.0.1:{free_port()}",
  ]
  assert_both_stop_with(
      common,
      [["--num_processes=2"], ["--num_processes=3"]],
      compilation_cache,
      "error: process 1 was given --num_processes 3, but 2 processes joined the run: give "
      "every process the same --num_processes",
  )
  assert not os.path.exists(tmp_path / "multi")


def test_two_processes_match_one_process_and_a_sigterm_to_one_stops_both(
    reference, compilation_cache, tmp_path
):
  """2 processes x 2 CPU devices (gloo) = the reference, for its 6 demo steps. They agree on
  stopping every preemption.SYNC_EVERY_STEPS (10) steps: a SIGTERM to process 1 alone, at step
  2 or so, stops both after step 10, each with its share of checkpoint 10 written, and both
  exit 0. Resumed, they agree every 10 batches of an evaluation too."""
  workdir = str(tmp_path / "multi")
  common = TINY + [
      f"--workdir={workdir}",
      "--config.max_steps=14",
      "--multihost",
      f"--coordinator_address=127.0.0.1:{free_port()}",
      "--num_processes=2",
  ]
  procs = [
      start("train.py", common + [f"--process_id={i}"], compilation_cache, devices=2)
      for i in range(2)
  ]
  err_1 = interrupt(procs[1], workdir, 2, signal.SIGTERM)
  _, err_0 = procs[0].communicate(timeout=300)
  assert [p.returncode for p in procs] == [0, 0], (err_0[-3000:], err_1[-3000:])
  assert "on 4 devices (2 processes)" in err_0
  # The same examples form each global batch; only their order across devices differs, so the
  # means differ by float summation order at most.
  np.testing.assert_allclose(losses(workdir)[:STEPS], losses(reference), rtol=1e-5)
  assert "SIGTERM received" in err_1 and "SIGTERM received" not in err_0
  assert "SIGTERM: stopped at step 10;" in err_1, err_1[-3000:]
  assert "SIGTERM (received by another process): stopped at step 10;" in err_0, err_0[-3000:]
  assert saved_steps(workdir)[-1] == 10
  assert [r["step"] for r in reporting.read_metrics(workdir)] == list(range(1, 11))

  # The same command resumes both; SIGTERM to process 1 after the third batch of the last
  # step's evaluation (45 batches of 8) stops both after the tenth, where they agree, and step
  # 14 is saved without its metrics.
  script = tmp_path / "signal_in_evaluation.py"
  script.write_text(SIGNAL_IN_EVALUATION)
  common = [a for a in common if not a.startswith("--coordinator_address")]
  common += [f"--coordinator_address=127.0.0.1:{free_port()}", "--config.eval_batch_size=8"]
  procs = [
      start(str(script), common + [f"--process_id={i}"], compilation_cache, devices=2)
      for i in range(2)
  ]
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for e in errs]
  for err, reason in zip(errs, ("SIGTERM (received by another process)", "SIGTERM")):
    assert "resumed at step 10" in err
    assert (
        f"{reason}: the evaluation of step 14 stopped after 10 of 45 val batches; skipped: the "
        "run is stopping"
    ) in err, err[-3000:]
    assert f"{reason}: stopped at step 14;" in err
  assert saved_steps(workdir)[-1] == 14
  assert "val_top1" not in reporting.read_metrics(workdir)[-1]


# train.py, with SIGTERM to process 1 after the third batch of its first evaluation
SIGNAL_IN_EVALUATION = f"""
import os, runpy, signal, sys
from fec_jax import tasks

update = tasks.Progress.update


def signalled(self, done, note=""):
  if done == 3 and "--process_id=1" in sys.argv:
    os.kill(os.getpid(), signal.SIGTERM)
  return update(self, done, note)


tasks.Progress.update = signalled
sys.argv[0] = {os.path.join(REPO, "train.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_eval_py_on_a_workdir_prints_the_logged_accuracy(reference, compilation_cache, tmp_path):
  """Run from another directory, without --config: the run's own config, its eval batch and
  dtype included, from its config.json."""
  rc, out, err = run("eval.py", [f"--workdir={reference}"], compilation_cache, cwd=tmp_path)
  assert rc == 0, err[-3000:]
  assert err == (
      f"evaluating {reference} (step {STEPS}, float32) on the val split of the demo data ...\n"
  )
  assert len(out.splitlines()) == 1  # the result, nothing else
  top1 = float(out.split("top-1 ")[1].split("%")[0])
  assert top1 == pytest.approx(reporting.read_metrics(reference)[-1]["val_top1"], abs=0.01)
  assert out.endswith(f"  [step {STEPS}]\n")  # which weights: the latest step, not the EMA
  # On 3 devices (eval_batch_size 120 divides; --batch 256, a --throughput flag, does not).
  rc, out, err = run("eval.py", [f"--workdir={reference}", "--per_class"], compilation_cache, 3)
  assert rc == 0, err[-3000:]
  lines = out.splitlines()  # a header, the 10 digits, the result
  assert lines[0].split() == ["class", "images", "top1", "top5"] and len(lines) == 12
  assert [line.split()[:2] for line in lines[1:11]] == [["digit", str(i)] for i in range(10)]
  assert sum(int(line.split()[2]) for line in lines[1:11]) == int(out.split("(")[1].split()[0])
  assert lines[11].startswith(f"top-1 {top1:.2f}%")


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["--config.base_lrr=1e-3"],
            "error: unknown config field 'base_lrr'; did you mean 'base_lr'?",
        ),
        (
            ["--config.data.root=/nonexistent", "--config.data.source=folder"],
            "expected a folder per class in <root>/train and <root>/val",
        ),
        (["--workdir="], "error: --workdir is empty; expected the path of the run's directory"),
        (
            ["--config.frozen=network_(0"],
            "error: config.frozen 'network_(0' is not a regular expression (missing ), "
            "unterminated",
        ),
        (
            ["--coordinator_address=127.0.0.1:12355", "--process_id=1"],
            "error: --coordinator_address, --process_id: used only with --multihost",
        ),
        (
            ["--multihost", "--coordinator_address=127.0.0.1"],
            "error: --coordinator_address '127.0.0.1': expected HOST:PORT",
        ),
        (
            ["--multihost", "--coordinator_address=127.0.0.1:99999"],
            "error: --coordinator_address '127.0.0.1:99999': expected HOST:PORT with a port in",
        ),
        (
            ["--multihost", "--num_processes=2", "--process_id=2"],
            "error: --process_id 2 must be in [0, --num_processes 2)",
        ),
    ],
)
def test_a_user_mistake_is_one_error_line(args, expected, compilation_cache, tmp_path):
  rc, _, err = run(
      "train.py", [f"--workdir={tmp_path / 'w'}", *TINY, *args], compilation_cache, timeout=300
  )
  assert rc == 2
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines[-1].startswith("error: ") and expected in lines[-1], err[-3000:]
  assert "Traceback" not in err
  assert not os.path.exists(tmp_path / "w")  # nothing was trained, nothing is left


def test_a_start_that_fails_after_a_compile_leaves_no_workdir(reference, tmp_path):
  """The init_from check comes after JAX's first compile, which makes the workdir's
  compilation_cache/ (cache_dir None: train.py's own cache); the failed run removes it."""
  args = [f"--config.init_from={reference}", "--config.model.name=fec_base"]
  rc, _, err = run("train.py", [f"--workdir={tmp_path / 'w'}", *TINY, *args], None, timeout=300)
  assert rc == 2 and "holds fec_small, which does not fit the config's fec_base" in err, err
  assert not os.path.exists(tmp_path / "w")


def test_eval_py_throughput_of_a_run_whose_data_moved(reference, compilation_cache, tmp_path):
  """--throughput times the model on zeros: the run's data folder, gone, is no error."""
  moved_data_run(reference, tmp_path / "run", tmp_path / "data")
  args = [f"--workdir={tmp_path / 'run'}", "--throughput", "--batch=2", "--warmup=0", "--iters=1"]
  rc, out, err = run("eval.py", args, compilation_cache, timeout=300)
  assert rc == 0 and out.startswith("throughput: "), err[-3000:]


@pytest.mark.parametrize(
    "case",
    [
        "both",
        "missing",
        "empty",
        "batch",
        "per_class",
        "classes",
        "classes_unread",
        "model",
        "task",
        "dtype",
        "eval_batch",
        "timing",
        "no_config",
        "moved_data",
        "renamed_class",
        "relabelled_tfds",
    ],
)
def test_eval_py_mistakes_are_one_error_line(case, reference, compilation_cache, tmp_path):
  if case == "classes_unread":  # the class count is checked before the arrays are read
    run_dir = shutil.copytree(reference, tmp_path / "run")
    shutil.rmtree(run_dir / str(max(int(d) for d in os.listdir(run_dir) if d.isdigit())) / "params")
  if case == "no_config":  # a run of an earlier fec-jax, without --config
    (shutil.copytree(reference, tmp_path / "old") / reporting.CONFIG_FILE).unlink()
  if case == "moved_data":  # a run on a data folder that has moved since
    moved_data_run(reference, tmp_path / "run", tmp_path / "data")
  if case == "renamed_class":  # a class folder renamed in place since the run started
    moved_data_run(reference, tmp_path / "run", tmp_path / "data")
    for split in ("train", "val"):
      for digit in range(10):
        (tmp_path / "data" / split / f"Digit{digit}").mkdir(parents=True)
    names = tuple(f"Digit{digit}" for digit in range(10))
    where = f"class folders in {tmp_path / 'data' / 'train'}"
    reporting.write_classes(str(tmp_path / "run"), (names, where))
    for split in ("train", "val"):  # 'digit0' sorts after 'Digit9': every label moves
      os.rename(tmp_path / "data" / split / "Digit0", tmp_path / "data" / split / "digit0")
  if case == "relabelled_tfds":  # a TFDS run whose ClassLabel names are others since it started
    tfds = pytest.importorskip("tensorflow_datasets")
    from tests.test_data_tfds import _build

    label = tfds.features.ClassLabel(names=[f"digit {digit}" for digit in range(10)])
    with pytest.MonkeyPatch.context() as mp:  # no look on GCS for the info of the dataset
      mp.setattr(tfds.core.DatasetInfo, "initialize_from_bucket", lambda self: None)
      _build(
          tmp_path / "tfds", "Digits", {"image": "image", "label": label}, (10, 10), lambda s, i: i
      )
    saved = reporting.read_config(str(shutil.copytree(reference, tmp_path / "run")))
    saved["data"].update(
        source="tfds", tfds_name="digits", tfds_data_dir=str(tmp_path / "tfds"), val_split="test"
    )
    (tmp_path / "run" / reporting.CONFIG_FILE).write_text(json.dumps(saved))
    where = f"label names of TFDS digits (data_dir {tmp_path / 'tfds'})"
    reporting.write_classes(str(tmp_path / "run"), (("zero", *label.names[1:]), where))
  args = {
      "both": [f"--workdir={reference}", f"--checkpoint={reference}"],
      "missing": [f"--checkpoint={tmp_path / 'nowhere'}"],
      "empty": ["--checkpoint="],
      "batch": [f"--checkpoint={reference}", "--throughput", "--batch=0"],
      "per_class": [f"--workdir={reference}", "--throughput", "--per_class"],
      "classes": [f"--workdir={reference}", "--config=configs/fec_small.py"],
      "classes_unread": [f"--workdir={tmp_path / 'run'}", "--config=configs/fec_small.py"],
      "model": [f"--workdir={reference}", "--config.model.name=fec_base"],
      "task": [f"--workdir={reference}", "--config=configs/demo_seg.py"],
      "dtype": [f"--workdir={reference}", "--config.model.dtype=bf16"],
      "eval_batch": [f"--workdir={reference}", "--config.eval_batch_size=0"],
      "timing": [f"--workdir={reference}", "--batch=4", "--iters=5"],
      "no_config": [f"--workdir={tmp_path / 'old'}"],
      "moved_data": [f"--workdir={tmp_path / 'run'}"],
      "renamed_class": [f"--workdir={tmp_path / 'run'}", "--per_class"],
      "relabelled_tfds": [f"--workdir={tmp_path / 'run'}"],
  }[case]
  expected = {
      "both": "exactly one of --workdir and --checkpoint",
      "missing": "does not exist",
      "empty": "--checkpoint is empty; expected the path of a convert_torch_weights.py output",
      "batch": "flag --batch=0: 0 is not a positive integer",
      "per_class": "--per_class tables an evaluation's metrics; --throughput measures speed",
      "classes": "the model has 10 classes but config.data.num_classes is 1000",
      "classes_unread": "the model has 10 classes but config.data.num_classes is 1000",
      "model": "holds fec_small; the config's model is fec_base: give that model's config",
      "task": "the config's model is fpn_fec_small: give a classification config "
      "(configs/fec_small.py, configs/demo.py)",
      "dtype": "config.model.dtype must be one of",
      "eval_batch": "config.eval_batch_size 0 must be a positive multiple",
      "timing": "--batch, --iters: used only with --throughput; the evaluation's batch is "
      "--config.eval_batch_size",
      "no_config": "has no config.json (a convert_torch_weights.py output, or a run of an earlier "
      "fec-jax) to take the config from; give --config, the config of its fec_small",
      "moved_data": f"config.data.root {tmp_path / 'data'} (the run's, from "
      f"{tmp_path / 'run' / reporting.CONFIG_FILE}) is not a directory",
      "renamed_class": f"--workdir {tmp_path / 'run'} holds a run whose labels index other "
      f"classes than config.data's: label 0 is 'Digit1' in the class folders in "
      f"{tmp_path / 'data' / 'train'} now, 'Digit0' when the run started "
      f"({tmp_path / 'run' / reporting.CLASSES_FILE}). Its predictions would be scored against "
      "other classes",
      "relabelled_tfds": f"--workdir {tmp_path / 'run'} holds a run whose labels index other "
      f"classes than config.data's: label 0 is 'digit 0' in the label names of TFDS digits "
      f"(data_dir {tmp_path / 'tfds'}) now, 'zero' when the run started "
      f"({tmp_path / 'run' / reporting.CLASSES_FILE}). Its predictions would be scored against "
      "other classes",
  }[case]
  rc, out, err = run("eval.py", args, compilation_cache, timeout=300)
  assert rc == 2 and not out
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err[-3000:]
