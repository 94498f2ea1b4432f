"""The training library in-process (fec_jax.loop.train_and_evaluate): what a run leaves in its
workdir, SIGTERM and resume, the non-finite stop, fine-tuning from a workdir (init_from), bad
input, and the loader's worker processes.

One reference run (tests/conftest.py: 6 demo steps at batch 8 on this process's devices, float32
compute) is shared with test_train_runs.py (each xdist worker makes its own); every run compiles
without XLA's backend optimizations and goes through a persistent compilation cache, so runs with
the same shapes compile once.
"""

import concurrent.futures
import fcntl
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import psutil
import pytest
import torch
from jax.experimental.compilation_cache import compilation_cache

import fec_jax
from configs import fec_base, finetune
from configs import workdir as workdir_config
from fec_jax import checkpoint, convert, data, loop, preemption, reporting, tasks
from fec_jax.data import device_transforms
from fec_jax.model import FAST_COMPILE, variable_shapes
from fec_jax.tasks import classification
from tests.imagenet_fixture import WNIDS, make_imagenet_folder
from tests.train_fixture import STEPS, losses, saved_steps, tiny, train

pytestmark = pytest.mark.usefixtures("compilation_cache")


def test_reference_run_writes_metrics_checkpoints_and_plot(reference):
  records = reporting.read_metrics(reference)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert all({"step", "epoch", "train_loss", "lr", "grad_norm"} <= r.keys() for r in records)
  assert {"val_top1", "val_top5", "val_loss", "ema_val_top1"} <= records[-1].keys()
  assert all(np.isfinite(losses(reference)))
  assert os.path.exists(os.path.join(reference, "curves.png"))
  assert any(
      f.startswith("events.out.tfevents")
      for f in os.listdir(os.path.join(reference, "tensorboard"))
  )
  assert saved_steps(reference) == [4, 6]  # keep_checkpoints=2


def test_evaluator_on_the_saved_weights_gives_the_logged_metrics(reference, caplog):
  model, variables = fec_jax.load_pretrained(reference)
  _, ema = fec_jax.load_pretrained(reference, ema=True)
  leaf = lambda v: np.asarray(v["params"]["head"]["kernel"])
  assert not np.array_equal(leaf(variables), leaf(ema))  # two different weight sets
  config = tiny()
  task = tasks.get(config)
  evaluator = task.evaluator(model, jax.sharding.Mesh(jax.devices(), ("data",)))
  metrics = evaluator(variables)
  metrics_ema = evaluator(ema)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="fec_jax.data.loader"):
    both = evaluator.evaluate([variables, ema])
  # The params and their EMA in one pass over the val split: read once, each set's own metrics.
  assert both == [metrics, metrics_ema]
  assert [r.getMessage() for r in caplog.records if r.name == "fec_jax.data.loader"] == [
      "val: 0 bad images masked out, 0 images converted to RGB"
  ]
  last = reporting.read_metrics(reference)[-1]
  assert metrics["top1"] == pytest.approx(last["val_top1"], abs=0.01)
  assert metrics_ema["top1"] == pytest.approx(last["ema_val_top1"], abs=0.01)
  assert metrics["images"] == last["val_images"] == data.num_examples(config.data, "val")
  # Per class (eval.py --per_class): the same metrics, and the classes' own that add up to them.
  by_class = evaluator(variables, per_class=True)
  table = by_class.pop("per_class")
  assert by_class == metrics
  images = table["images"]
  assert images.dtype == np.int64 and images.sum() == metrics["images"] and images.min() > 0
  for k in ("top1", "top5"):
    assert (table[k] * images).sum() / images.sum() == pytest.approx(metrics[k], abs=1e-6)
  names = task.class_names()
  assert names[3] == "digit 3" and len(names) == len(images) == config.data.num_classes
  rows = task.per_class_table(table).splitlines()
  assert rows[0].split() == ["class", "images", "top1", "top5"]
  assert rows[1].split()[-3:] == [
      str(images[0]),
      f"{table['top1'][0]:.2f}",
      f"{table['top5'][0]:.2f}",
  ]


def test_to_torch_writes_the_chosen_step_of_a_run_and_its_ema(reference, tmp_path, capsys):
  """convert_torch_weights.py --to-torch on a workdir: --step=4 --ema writes step 4's EMA weights
  bit for bit (the latest step is 6); a step that was not kept is one error, nothing written."""
  out = tmp_path / "step4.pth"
  args = ["--input", reference, "--output", str(out), "--to-torch", "--ema"]
  assert convert.main([*args, "--step=4"]) == 0
  assert capsys.readouterr().out == (
      f"wrote 282 tensors of fec_small (the EMA weights of step 4) to {out}\n"
  )
  _, ema4 = fec_jax.load_pretrained(reference, step=4, ema=True)
  expected = convert.variables_to_torch(ema4)
  written = torch.load(out, weights_only=True)
  assert written.keys() == expected.keys()
  for k, v in expected.items():
    np.testing.assert_array_equal(written[k].numpy(), v, err_msg=k)
  _, ema6 = fec_jax.load_pretrained(reference, ema=True)
  assert not np.array_equal(
      convert.variables_to_torch(ema6)["head.weight"], expected["head.weight"]
  )
  with pytest.raises(SystemExit) as e:
    convert.main([*args[:3], str(tmp_path / "step2.pth"), *args[4:], "--step=2"])
  assert e.value.code == 2
  assert capsys.readouterr().err == f"error: {reference} has no step 2; saved steps: [4, 6]\n"
  assert os.listdir(tmp_path) == ["step4.pth"]


def test_evaluator_counts_the_readable_images_and_refuses_none(tmp_path):
  """An unreadable val image is left out of the metrics and of their count; with none
  readable, an error, not 0% (or NaN) over nothing."""
  root = make_imagenet_folder(tmp_path / "data", num_classes=3, per_class=1, size=(40, 48))
  val = sorted(str(p) for p in (tmp_path / "data" / "val").rglob("*.JPEG"))  # 6 images
  open(val[0], "wb").write(b"not a JPEG")
  config = finetune_config(root, "")
  task, mesh = tasks.get(config), jax.sharding.Mesh(jax.devices(), ("data",))
  model = task.create_model()[0]
  variables = fec_jax.init_variables(model, jax.random.key(0), task.input_shape())
  metrics = task.evaluator(model, mesh)(variables)
  assert metrics["images"] == 5
  assert task.describe(metrics).endswith("(5 val images)")
  for path in val[1:]:
    open(path, "wb").write(b"")
  with pytest.raises(data.DataNotFoundError, match=f"no readable val image in {root}"):
    task.evaluator(model, mesh)(variables)


def test_bf16_evaluation_does_not_depend_on_the_eval_batch_size():
  """XLA may keep a fused bf16 intermediate in fp32, and what it fuses depends on the shapes;
  the evaluator rounds as the program says, so 3 val batches of 120 give one batch of 360's
  metrics (the loss up to the order of its fp32 sums)."""
  mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  metrics = []
  for batch in (120, 360):
    task = tasks.get(tiny(eval_batch_size=batch, **{"model.dtype": "bfloat16"}))
    model = task.create_model()[0]
    variables = fec_jax.init_variables(model, jax.random.key(0), task.input_shape())
    metrics.append(task.evaluator(model, mesh, FAST_COMPILE)(variables))
  assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-6)
  assert {k: v for k, v in metrics[0].items() if k != "loss"} == {
      k: v for k, v in metrics[1].items() if k != "loss"
  }


class SignalAt:
  """Sends `sig` to this process once the workdir's metrics.jsonl has `lines` records."""

  def __init__(self, workdir, lines: int, sig=signal.SIGTERM):
    self._path, self._lines, self._sig = os.path.join(workdir, "metrics.jsonl"), lines, sig
    self._thread = threading.Thread(target=self._watch, daemon=True)
    self._thread.start()

  def _watch(self):
    deadline = time.time() + 600
    while time.time() < deadline:
      if os.path.exists(self._path) and len(open(self._path).readlines()) >= self._lines:
        os.kill(os.getpid(), self._sig)
        return
      time.sleep(0.01)


def test_sigterm_checkpoints_the_current_step_and_the_rerun_matches(reference, tmp_path):
  workdir = tmp_path / "preempted"
  SignalAt(workdir, lines=2)
  first = train(tiny(), workdir)
  assert first.preempted and 2 <= first.step < STEPS
  assert saved_steps(workdir)[-1] == first.step  # the step it stopped at was saved
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
  (workdir / reporting.CONFIG_FILE).unlink()  # as a workdir of an earlier fec-jax
  second = train(tiny(), workdir)
  assert second.step == STEPS and not second.preempted
  assert reporting.read_config(str(workdir)) == reporting.config_data(tiny())  # written again
  assert losses(workdir) == losses(reference)  # bit-identical
  assert (
      reporting.read_metrics(workdir)[-1]["val_top1"]
      == reporting.read_metrics(reference)[-1]["val_top1"]
  )


def test_a_signal_at_the_last_step_saves_it_and_the_rerun_evaluates_it(
    reference, tmp_path, monkeypatch
):
  """A signal during the last step stops the run there as at any other step (the final
  evaluation, which takes minutes on ImageNet, is skipped and the step saved); the same command
  then runs that evaluation, and metrics.jsonl reads as the uninterrupted run's."""

  def signal_at_last_step(self, step, agree=False):
    if step == STEPS:
      self.signal_name = "SIGTERM"
    return self.signal_name is not None

  monkeypatch.setattr(preemption.Preemption, "stop_now", signal_at_last_step)
  workdir = tmp_path / "w"
  first = train(tiny(), workdir)
  assert first.preempted and first.step == STEPS and saved_steps(workdir)[-1] == STEPS
  assert "val_top1" not in reporting.read_metrics(workdir)[-1]
  monkeypatch.undo()
  stopped = reporting.read_metrics(workdir)

  def fails(self, variable_sets, **kwargs):
    raise RuntimeError("the evaluation failed")

  monkeypatch.setattr(classification.TopK, "evaluate", fails)
  with pytest.raises(RuntimeError, match="the evaluation failed"):
    train(tiny(), workdir)
  assert reporting.read_metrics(workdir) == stopped  # kept for the next try
  monkeypatch.undo()
  second = train(tiny(), workdir)
  assert second.step == STEPS and not second.preempted
  assert reporting.read_metrics(workdir) == reporting.read_metrics(reference)
  third = train(tiny(), workdir)  # now nothing is left to do
  assert third.step == STEPS and third.record == {}


def test_a_run_resumed_with_max_steps_cut_to_its_checkpoint_evaluates_that_step(
    reference, tmp_path, caplog
):
  """Killed after the records of steps past its last checkpoint (4), a run resumed with max_steps
  4 ends at step 4 with its evaluation: the records after it (dropped on resume) do not count as
  the last step's (the record was {} and the run had no final evaluation)."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / str(STEPS))  # a kill -9 after step 6's record, before its checkpoint
  before = reporting.read_metrics(workdir)
  assert [r["step"] for r in before] == list(range(1, STEPS + 1)) and "val_top1" not in before[3]
  with caplog.at_level(logging.INFO):
    result = train(tiny(max_steps=4), workdir)
  assert result.step == 4 and not result.preempted and "val_top1" in result.record
  assert "step 4, the run's last, was saved without its evaluation" in caplog.text
  records = reporting.read_metrics(workdir)
  assert records[:3] == before[:3] and records[-1] == result.record
  assert {k: v for k, v in result.record.items() if "val_" not in k} == before[3]


def test_a_signal_during_an_evaluation_stops_it_and_the_run(
    reference, tmp_path, monkeypatch, caplog
):
  """A signal stops an evaluation after the batch under way (on ADE20K's images of many sizes an
  evaluation takes minutes, a preempted VM has seconds): the step is saved without its metrics
  and the run stops there. At the last step the same command then evaluates it (and a signal
  during that evaluation stops it again), and metrics.jsonl reads as the uninterrupted run's."""
  evaluate = classification.TopK.evaluate

  def signalled(self, variable_sets, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return evaluate(self, variable_sets, **kwargs)

  monkeypatch.setattr(classification.TopK, "evaluate", signalled)
  with caplog.at_level(logging.INFO):
    result = train(tiny(eval_every_steps=2), tmp_path / "w")
  assert result.preempted and result.step == 2 and saved_steps(tmp_path / "w") == [2]
  assert "val_top1" not in reporting.read_metrics(tmp_path / "w")[-1]
  batches = data.num_eval_batches(tiny().data, tiny().eval_batch_size)
  assert (
      batches > 1
      and (
          f"SIGTERM: the evaluation of step 2 stopped after 1 of {batches} val batches; skipped: the "
          "run is stopping"
      )
      in caplog.text
  )
  workdir = tmp_path / "last"
  shutil.copytree(reference, workdir)
  records = reporting.read_metrics(workdir)
  unevaluated = {k: v for k, v in records[-1].items() if "val_" not in k}
  with open(workdir / reporting.METRICS_FILE, "w") as f:  # as a run stopped at its last step
    f.writelines(json.dumps(r) + "\n" for r in [*records[:-1], unevaluated])
  result = train(tiny(), workdir)
  assert result.preempted and result.step == STEPS
  assert reporting.read_metrics(workdir)[-1] == unevaluated

  def killed(self, variable_sets, **kwargs):  # a loader worker died of the signal
    os.kill(os.getpid(), signal.SIGTERM)
    raise RuntimeError("Worker process was terminated unexpectedly with exit code -15.")

  monkeypatch.setattr(classification.TopK, "evaluate", killed)
  result = train(tiny(), workdir)
  assert result.preempted and reporting.read_metrics(workdir)[-1] == unevaluated
  monkeypatch.setattr(classification.TopK, "evaluate", evaluate)
  result = train(tiny(), workdir)
  assert not result.preempted and reporting.read_metrics(workdir) == records


def test_an_evaluation_failed_by_a_signal_is_skipped_and_its_step_saved(tmp_path, monkeypatch):
  """SIGTERM to the process group can kill an evaluation's loader worker that is still starting,
  which fails the evaluation: the run is stopping anyway, so it skips the evaluation and saves
  the step. Without a signal the error stands, once the step is saved."""

  def fails(signum):
    def evaluate(self, variable_sets, **kwargs):
      if signum:
        os.kill(os.getpid(), signum)
      raise RuntimeError("Worker process was terminated unexpectedly with exit code -15.")

    return evaluate

  monkeypatch.setattr(classification.TopK, "evaluate", fails(signal.SIGTERM))
  result = train(tiny(eval_every_steps=2), tmp_path / "w")
  assert result.preempted and result.step == 2 and saved_steps(tmp_path / "w") == [2]
  assert "val_top1" not in reporting.read_metrics(tmp_path / "w")[-1]
  evaluate = classification.TopK.evaluate
  monkeypatch.setattr(classification.TopK, "evaluate", fails(None))
  with pytest.raises(RuntimeError, match="terminated unexpectedly"):
    train(tiny(eval_every_steps=1, checkpoint_every_steps=10), tmp_path / "w2")
  # The error stands, after the step's record and checkpoint: the steps trained are kept.
  assert saved_steps(tmp_path / "w2") == [1]
  assert reporting.read_metrics(tmp_path / "w2")[-1].keys() == {
      "step",
      "epoch",
      "train_loss",
      "lr",
      "grad_norm",
  }
  monkeypatch.setattr(classification.TopK, "evaluate", evaluate)
  result = train(tiny(eval_every_steps=1, checkpoint_every_steps=10, max_steps=2), tmp_path / "w2")
  assert result.step == 2 and [r["step"] for r in reporting.read_metrics(tmp_path / "w2")] == [1, 2]


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(reference, tmp_path, monkeypatch):
  # Infinite images from here on: the next loss is NaN.
  monkeypatch.setattr(
      device_transforms, "normalize", lambda images, mean, std: jnp.full(images.shape, jnp.inf)
  )
  with pytest.raises(
      loop.TrainingDiverged, match=f"at step 1; stopped, no checkpoint was saved yet in {tmp_path}"
  ):
    train(tiny(), tmp_path)
  workdir = tmp_path / "diverged"
  shutil.copytree(reference, workdir)
  with pytest.raises(loop.TrainingDiverged, match="at step 7.*last good checkpoint is step 6"):
    train(tiny(max_steps=8), workdir)  # resumed at step 6
  assert saved_steps(workdir) == [4, 6]


def test_a_train_data_error_saves_the_steps_trained_and_the_rerun_matches(
    reference, tmp_path, monkeypatch, caplog
):
  """Reading step 4's batch fails (an I/O error in its first image): step 3 is saved with its
  record, and the error stands; the same command then resumes there and trains as the
  uninterrupted run did."""
  transform, calls = data.transforms.train_transform, []

  def train_transform(*args):
    calls.append(None)
    if len(calls) > 8 * 3:
      raise OSError("Input/output error")
    return transform(*args)

  monkeypatch.setattr(data.transforms, "train_transform", train_transform)
  # The demo loader makes its batches in this process, in one thread: in order. A record at the
  # checkpoints (steps 2, 4, 6) only.
  config = tiny(log_every_steps=10, **{"data.read_threads": 1})
  with caplog.at_level(logging.WARNING), pytest.raises(OSError, match="Input/output error"):
    train(config, tmp_path)
  assert saved_steps(tmp_path) == [2, 3]
  assert (
      f"reading the batch of step 4 failed (Input/output error); step 3 is saved in {tmp_path}"
      in caplog.text
  )
  records = reporting.read_metrics(tmp_path)
  expected = losses(reference)  # one per step
  assert [r["step"] for r in records] == [2, 3]
  assert records[-1]["train_loss"] == expected[2]  # the steps since the last record: step 3
  monkeypatch.setattr(data.transforms, "train_transform", transform)
  train(config, tmp_path)
  records = reporting.read_metrics(tmp_path)
  assert [r["step"] for r in records] == [2, 3, 4, 6]
  assert records[-1]["train_loss"] == np.mean(expected[4:6])


@pytest.mark.parametrize("case", ["recorded", "saved", "save fails"])
def test_a_train_data_error_after_a_recorded_or_saved_step(case, caplog):
  """loop._next_batch's other cases, on a stand-in run: step 3 already recorded (a record every
  step) is saved without a second record; step 3 just saved is not saved again; where the save
  fails too, an error line says so and the batch's error stands."""
  saved, written = [], []

  def save(state):
    if case == "save fails":
      raise OSError("No space left on device")
    saved.append(state)

  def read():
    raise OSError("Input/output error")

  run = types.SimpleNamespace(
      train_iter=iter(read, None),
      mesh=None,
      mngr=types.SimpleNamespace(
          latest_step=lambda: 3 if case == "saved" else 2, wait_until_finished=lambda: None
      ),
      writer=types.SimpleNamespace(write=written.append),
      save=save,
      workdir="w",
  )
  with caplog.at_level(logging.WARNING), pytest.raises(OSError, match="Input/output error"):
    loop._next_batch(run, "state at step 3", [], 3)
  assert written == [] and saved == (["state at step 3"] if case == "recorded" else [])
  read_failed = "reading the batch of step 4 failed (Input/output error)"
  assert [(r.levelname, r.getMessage()) for r in caplog.records] == {
      "recorded": [
          ("WARNING", f"{read_failed}; step 3 is saved in w: run the same command to resume there")
      ],
      "saved": [],
      "save fails": [
          ("ERROR", f"{read_failed}; saving step 3 failed too: No space left on device")
      ],
  }[case]


def test_a_failed_compile_waits_for_the_state_initialization(tmp_path, monkeypatch, caplog, capfd):
  """A fresh state is initialized in a thread beside the train step's compile: a compile that
  failed left that thread running, into the next run in this process (and the process's exit
  waited for it), and a failure of its own was lost. The run joins the thread now (not only its
  Future, which the thread outlives: here by a done callback) and logs that failure. A Ctrl-C
  during that wait said "then saving a checkpoint" though nothing is saved."""

  def create_state(*args, **kwargs):
    time.sleep(5)  # still at work when the compile fails
    raise RuntimeError("out of memory for the state")

  class Lingering(concurrent.futures.ThreadPoolExecutor):

    def submit(self, fn, /, *args, **kwargs):
      future = super().submit(fn, *args, **kwargs)
      self.initializes = fn is loop._fresh_state
      if self.initializes:  # the init thread goes on after the Future is done
        future.add_done_callback(lambda _: time.sleep(2))
      return future

    def shutdown(self, wait=True, **kwargs):
      if wait and getattr(self, "initializes", False):  # the run's wait for the init thread
        os.kill(os.getpid(), signal.SIGINT)
      super().shutdown(wait, **kwargs)

  monkeypatch.setattr(loop.training, "create_state", create_state)
  monkeypatch.setattr(loop.concurrent.futures, "ThreadPoolExecutor", Lingering)
  with caplog.at_level(logging.WARNING), pytest.raises(Exception, match="xla_no_such_option"):
    loop.train_and_evaluate(tiny(), str(tmp_path), compiler_options={"xla_no_such_option": True})
  assert not [t for t in threading.enumerate() if t.name.startswith("init_")]
  failed = "the train state's initialization failed too: RuntimeError: out of memory for the state"
  assert failed in [r.getMessage() for r in caplog.records]
  said = (
      "SIGINT received: the run failed; exiting once the work under way ends: the train state's "
      "initialization, a checkpoint being written (send it again to exit at once)"
  )
  assert capfd.readouterr().err.splitlines().count(said) == 1


def finetune_config(root, init_from, **overrides):
  c = finetune.get_config()
  c.data.root, c.data.num_classes, c.data.image_size = str(root), 3, 32
  c.data.num_workers, c.data.rand_augment, c.data.reprob = 0, "", 0.0
  c.model.dtype, c.init_from = "float32", init_from
  c.global_batch_size, c.eval_batch_size, c.max_steps, c.log_every_steps = 4, 6, 2, 1
  for key, value in overrides.items():
    c[key] = value
  return c


def test_finetune_from_a_workdir_on_another_number_of_classes(
    reference, tmp_path, caplog, monkeypatch
):
  root = make_imagenet_folder(tmp_path / "data", num_classes=3, per_class=4, size=(40, 48))
  workdir = tmp_path / "finetuned"
  monkeypatch.chdir(tmp_path)  # relative paths: config.json records them absolute
  with caplog.at_level(logging.INFO):
    result = train(finetune_config("data", os.path.relpath(reference)), "finetuned")
  assert result.step == 2
  saved = reporting.read_config(str(workdir))
  assert (saved["data"]["root"], saved["init_from"]) == (str(root), reference)
  recorded = (WNIDS[:3], f"class folders in {root}/train")  # the names the labels index
  assert reporting.read_classes(str(workdir)) == recorded
  assert "head re-initialized for 3 classes" in caplog.text
  # base_lr 1e-4 at batch 4 is a peak lr of 3.9e-7, which the cosine would raise to min_lr 1e-6
  assert "the peak lr 3.91e-07 (base_lr x global_batch_size / 1024) is below min_lr 1e-06" in (
      caplog.text
  )
  _, source = fec_jax.load_pretrained(reference)
  _, tuned = fec_jax.load_pretrained(str(workdir))
  assert tuned["params"]["head"]["kernel"].shape == (320, 3)
  # Two AdamW steps at lr <= 2.5e-5 move each weight by at most ~5e-5: the body is the source's.
  body = lambda v: {k: w for k, w in v["params"].items() if k != "head"}
  for a, b in zip(jax.tree.leaves(body(source)), jax.tree.leaves(body(tuned))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
  caplog.clear()
  del saved["init_from_step"]  # a config.json of a run that started before that field
  (workdir / reporting.CONFIG_FILE).write_text(json.dumps(saved))
  with caplog.at_level(logging.INFO):  # the same workdir again resumes, init_from unused
    config = finetune_config(root, reference, max_steps=3, init_from_step=4)
    assert train(config, workdir).step == 3
  assert "init_from is used only for a fresh workdir" in caplog.text
  assert "resumed at step 2" in caplog.text
  assert re.search(r"reading the first train batch: \d+\.\d s", caplog.text)  # loader start
  assert reporting.read_classes(str(workdir)) == recorded
  saved = reporting.read_config(str(workdir))  # what the run started from, not the resume's
  assert (saved["init_from"], saved["init_from_step"], saved["max_steps"]) == (reference, -1, 3)


def test_init_from_step_takes_that_step(reference, tmp_path):
  """config.init_from_step=4 starts from the reference's step 4 (its latest is 6); a step it did
  not keep is one error naming those it did, before any data is read."""
  config = tiny(init_from=reference, init_from_step=4)
  start = loop._start(config, str(tmp_path / "w"), tasks.get(config))
  assert start.source == f"{reference} step 4"
  _, step4 = fec_jax.load_pretrained(reference, step=4)
  jax.tree.map(np.testing.assert_array_equal, start.pretrained, step4)
  config.init_from_step = 2
  with pytest.raises(checkpoint.CheckpointError, match=r"has no step 2; saved steps: \[4, 6\]"):
    loop._start(config, str(tmp_path / "w"), tasks.get(config))
  config.init_from_step = -2
  with pytest.raises(ValueError, match="config.init_from_step is a saved step"):
    train(config, tmp_path / "w")


def test_init_from_step_of_a_converter_output_says_it_holds_step_0_only(tmp_path):
  """The converter writes step 0 only: init_from_step=4 on its output said "has no step 4; saved
  steps: [0]" alone; step 0 is its weights."""
  converted = str(tmp_path / "converted")
  shapes = variable_shapes(fec_jax.create_model("fec_small", num_classes=10))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
  checkpoint.save_params(converted, zeros, "fec_small", {"num_classes": 10})
  config = tiny(init_from=converted, init_from_step=4)
  with pytest.raises(checkpoint.CheckpointError) as e:
    loop._start(config, str(tmp_path / "w"), tasks.get(config))
  assert str(e.value) == (
      f"{converted} has no step 4: it holds converted weights (a convert_torch_weights.py "
      "output), which are step 0 only; a step (--step, --config.init_from_step) is for a "
      "train.py run's workdir: leave it out"
  )
  config.init_from_step = 0
  assert loop._start(config, str(tmp_path / "w"), tasks.get(config)).source == f"{converted} step 0"


def test_init_from_a_run_of_as_many_other_classes_warns_that_its_head_is_kept(tmp_path, caplog):
  """A fine-tune from a run on 3 other classes keeps its head (nothing to re-initialize for 3
  classes), whose rows then score the data's labels by index: a warning names the first label
  that differs. From a run of the same classes, or of another count (the head re-initialized),
  there is none."""
  root = make_imagenet_folder(tmp_path / "data", num_classes=3, per_class=1, size=(8, 8))
  run = str(tmp_path / "run")
  shapes = variable_shapes(fec_jax.create_model("fec_small", num_classes=3))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
  checkpoint.save_params(run, zeros, "fec_small", {"num_classes": 3})
  config = finetune_config(root, run)
  warned = lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  for names, warns in [(("cat", *WNIDS[:2]), True), (WNIDS[:3], False), (WNIDS[:4], False)]:
    reporting.write_classes(run, (names, "class folders in /pets/train"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      loop._start(config, str(tmp_path / "w"), tasks.get(config))
    if not warns:
      assert warned() == []
      continue
    assert warned() == [
        f"init_from: {run} holds a run of other classes, as many as the data's, so the weights "
        "it learnt for them (a classifier's head) are kept and score the data's labels by index: "
        f"label 0 is '{WNIDS[0]}' in the class folders in {root}/train now, 'cat' in the class "
        f"folders in /pets/train when the run started ({run}/classes.json)"
    ]


def test_an_init_froms_classes_json_that_cannot_be_read_is_a_warning(tmp_path, caplog, monkeypatch):
  """init_from's classes.json that cannot be read (permissions: an OSError) ended the start with a
  traceback; it is read_classes' ValueError, as one that is not JSON, which a resume and eval.py
  report as one error line, and init_from's weights still start the run, with a warning."""
  root = make_imagenet_folder(tmp_path / "data", num_classes=3, per_class=1, size=(8, 8))
  run = str(tmp_path / "run")
  shapes = variable_shapes(fec_jax.create_model("fec_small", num_classes=3))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
  checkpoint.save_params(run, zeros, "fec_small", {"num_classes": 3})
  reporting.write_classes(run, (WNIDS[:3], "class folders in /pets/train"))

  def unreadable(path, *args, **kwargs):  # chmod 0 does not stop root
    if os.path.basename(path) == reporting.CLASSES_FILE:
      raise PermissionError(13, "Permission denied", path)
    return open(path, *args, **kwargs)

  monkeypatch.setattr(reporting, "open", unreadable, raising=False)
  expected = (
      f"{run}/classes.json cannot be read (Permission denied); expected "
      '{"origin": "...", "names": [...]}, the names the run\'s labels had'
  )
  with pytest.raises(ValueError) as e:
    reporting.read_classes(run)
  assert str(e.value) == expected
  config = finetune_config(root, run)
  with caplog.at_level(logging.WARNING):
    assert loop._start(config, str(tmp_path / "w"), tasks.get(config)).pretrained is not None
  assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
      f"init_from: {expected}; its classes are not compared with the data's"
  ]


def test_a_workdir_in_a_split_of_the_data_is_refused_before_it_is_made(tmp_path):
  """A workdir in a class folder (or in a split folder, where it is a class of its own) had the
  run read its files as data: curves.png as an image of the class, from the next start on. Such a
  workdir is one error before it is created; one beside the splits is fine."""
  root = make_imagenet_folder(tmp_path / "data", num_classes=3, per_class=1, size=(8, 8))
  config = finetune_config(root, str(tmp_path / "nowhere"))
  for split, workdir in [("train", f"{root}/train/{WNIDS[0]}/run"), ("val", f"{root}/val/run")]:
    with pytest.raises(ValueError) as e:
      train(config, workdir)
    assert str(e.value) == (
        f"--workdir {workdir} lies in the {split} split of config.data.root, {root}/{split}: its "
        "folders are classes and its images examples, so the run would read its own files as "
        "data; give a --workdir outside the data's split folders"
    )
    assert not os.path.exists(workdir)
  loop._check_workdir_outside_data(config, f"{root}/runs/a")  # beside the splits
  # A class folder that is a link (kept elsewhere): the real path of a workdir in it is outside
  # the data, but the run reads it through the link all the same.
  (tmp_path / "elsewhere").mkdir()
  os.symlink(tmp_path / "elsewhere", f"{root}/train/linked")
  with pytest.raises(ValueError, match="lies in the train split of config.data.root"):
    train(config, f"{root}/train/linked/run")
  assert not (tmp_path / "elsewhere" / "run").exists()
  loop._check_workdir_outside_data(finetune_config(f"{root}/train", ""), f"{root}/val/run")


def test_init_from_a_checkpoint_that_does_not_fit_lists_the_params(reference, tmp_path):
  config = finetune_config(tmp_path, reference)
  config.model.name = "fec_base"  # a fec_small workdir
  root = make_imagenet_folder(tmp_path / "data", num_classes=3, per_class=4, size=(40, 48))
  config.data.root = root
  with pytest.raises(checkpoint.CheckpointError) as e:
    train(config, tmp_path / "w")
  assert str(e.value) == (  # one line: the list of params would only show the two models
      f"config.init_from {reference} holds fec_small, which does not fit the config's fec_base "
      "(100 params differ): give a fec_base checkpoint, or --config.model.name=fec_small to "
      "fine-tune fec_small"
  )
  assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")  # nothing was trained
  with pytest.raises(checkpoint.CheckpointError) as e:
    train(finetune_config(root, str(tmp_path / "nowhere")), tmp_path / "w2")
  assert str(e.value) == (
      f"config.init_from {tmp_path}/nowhere does not exist; expected the --output of "
      "convert_torch_weights.py or a train.py --workdir"
  )


PROBE = "(?!head/)"  # config.frozen of a linear probe: every param but the head's


def test_a_linear_probe_trains_the_head_alone_and_resumes_bit_exact(reference, tmp_path, caplog):
  """config.frozen in a fine-tune on 3 classes (the head re-initialized): the frozen params and
  their EMA are init_from's weights bit for bit after the steps, the head is trained, the
  checkpoints hold Adam's moments of the head alone, and a run stopped after 2 steps resumes to
  the uninterrupted run's losses and weights; a resume with another config.frozen stops before
  the data."""
  root = make_imagenet_folder(tmp_path / "data", num_classes=3, per_class=4, size=(40, 48))
  config = lambda max_steps, frozen=PROBE: finetune_config(
      root, reference, frozen=frozen, max_steps=max_steps, ema_decay=0.9, checkpoint_every_steps=2
  )
  straight = str(tmp_path / "straight")
  with caplog.at_level(logging.INFO):
    assert train(config(4), straight).step == 4
  assert "init_from: head re-initialized for 3 classes" in caplog.text
  assert (
      "config.frozen '(?!head/)': 100 arrays (5,406,528 parameters) frozen, 2 arrays (963 "
      "parameters) trained" in caplog.messages
  )
  source = fec_jax.load_pretrained(reference)[1]["params"]
  del source["head"]
  heads = []
  for step, ema in ((4, False), (4, True), (2, False)):
    tuned = fec_jax.load_pretrained(straight, step, ema=ema)[1]["params"]
    heads.append(tuned.pop("head"))
    jax.tree.map(np.testing.assert_array_equal, tuned, source)
  assert not np.array_equal(heads[0]["kernel"], heads[2]["kernel"])  # trained from step 2 to 4
  saved = checkpoint._saved_tree(straight, 4, checkpoint.OPT_STATE_ITEM)
  moments = [  # the leaves of [] shape are step counts
      jax.tree_util.keystr(path)
      for path, leaf in jax.tree_util.tree_leaves_with_path(saved)
      if leaf.shape != ()
  ]
  assert len(moments) == 4 and all("['head']" in m for m in moments), moments
  workdir = tmp_path / "resumed"
  assert train(config(2), workdir).step == 2
  assert train(config(4), workdir).step == 4
  assert losses(workdir) == losses(straight)
  for ema in (False, True):
    jax.tree.map(
        np.testing.assert_array_equal,
        fec_jax.load_pretrained(str(workdir), ema=ema)[1],
        fec_jax.load_pretrained(straight, ema=ema)[1],
    )
  assert reporting.read_config(str(workdir))["frozen"] == PROBE
  for frozen, now in (("", "''"), ("(?!head/|norm/)", "'(?!head/|norm/)'")):
    with pytest.raises(
        checkpoint.CheckpointError, match=re.escape(f"frozen {PROBE!r} (now {now})")
    ):
      train(config(6, frozen), workdir)
  assert saved_steps(workdir) == [2, 4]


def test_a_run_whose_config_json_predates_frozen_resumes_with_nothing_frozen(reference, tmp_path):
  """A config.json of a run from before config.frozen lacks it: the run trained every param,
  and resumes so (frozen '' compares equal), but not with params frozen now."""
  workdir = tmp_path / "older"
  shutil.copytree(reference, workdir)
  older = reporting.read_config(str(workdir))
  del older["frozen"]
  (workdir / reporting.CONFIG_FILE).write_text(json.dumps(older))
  with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"frozen '' (now {PROBE!r})")):
    train(tiny(frozen=PROBE), workdir)
  assert workdir_config.get_config(str(workdir)).frozen == ""  # eval.py's config of the run
  assert train(tiny(), workdir).step == STEPS  # restored; nothing left to train
  assert reporting.read_config(str(workdir))["frozen"] == ""


def test_a_frozen_pattern_that_cannot_run_stops_before_the_data(tmp_path, data_not_opened):
  for frozen, expected in (
      ("network_(0", r"config.frozen 'network_\(0' is not a regular expression"),
      ("backbone/", "config.frozen 'backbone/' matches no param: "),
      (".*", r"config.frozen '\.\*' matches every param: "),
  ):
    with pytest.raises(ValueError, match=expected):
      train(tiny(frozen=frozen), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_frozen_params_left_at_their_initialization_are_warned(
    reference, tmp_path, caplog, data_not_opened
):
  """A frozen param that init_from does not give (the head re-initialized for 3 classes), or any
  frozen param without init_from, would train on from random weights it never leaves: a warning
  names them before the data is opened; a linear probe of init_from's weights gets none."""
  root = make_imagenet_folder(tmp_path / "data", num_classes=3, per_class=2, size=(40, 48))
  runs = (
      (finetune_config(root, reference, frozen="head/|network_0/"), "keeps 2 arrays"),
      (finetune_config(root, reference, frozen=PROBE), None),
      (tiny(frozen="network_0/"), "keeps the 18 arrays"),
  )
  for config, expected in runs:
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(AssertionError, match="data was opened"):
      train(config, tmp_path / "w")
    warnings = [m for m in caplog.messages if "at their initialization" in m]
    if expected is None:
      assert warnings == []
    elif config.init_from:
      assert warnings == [
          f"config.frozen {config.frozen!r} {expected} at their initialization, which "
          f"{reference} does not give: head/bias, head/kernel"
      ]
    else:
      assert warnings == [
          f"config.frozen {config.frozen!r} {expected} it freezes at their "
          "initialization: there is no config.init_from"
      ]


def test_a_fine_tune_without_init_from_is_refused(tmp_path):
  """configs/finetune.py's lr and schedule are for pretrained weights: a fresh run without
  init_from stops before anything is read, unless told to start from random weights."""
  config = finetune_config(tmp_path / "data", "")
  with pytest.raises(ValueError) as e:
    train(config, tmp_path / "w")
  assert str(e.value) == (
      "config.init_from is not set, and this config fine-tunes (config.init_from_required): "
      "give --config.init_from=DIR (a convert_torch_weights.py output or a train.py workdir), "
      "or --config.init_from_required=False to train from random weights"
  )
  assert not os.path.exists(tmp_path / "w")
  config.init_from_required = False
  assert loop._start(config, str(tmp_path / "w"), tasks.get(config)).pretrained is None


def test_a_resume_may_change_init_from_required(tmp_path):
  """A resume does not read init_from_required, as none of init_from's options: a resume with
  another value goes on (a fine-tune from random weights resumed with configs/finetune.py alone),
  and config.json keeps the run's."""
  reporting.write_config(str(tmp_path), tiny())
  again = tiny(init_from_required=True)
  saved = loop._check_same_run(again, str(tmp_path), frozenset())
  start = loop._Start(None, again.model.name, {}, STEPS, None, "", saved)
  loop._record_config(again, str(tmp_path), start)
  assert reporting.read_config(str(tmp_path))["init_from_required"] is False


def test_a_workdir_in_use_by_another_run_is_refused(reference, tmp_path):
  """Two runs on one workdir would interleave their records and checkpoints: the second stops
  at once, naming the first; the lock goes with the run that held it."""
  workdir = shutil.copytree(reference, tmp_path / "w")
  with open(workdir / loop.LOCK_FILE, "w") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    held.write("pid 123 on elsewhere")
    held.flush()
    with pytest.raises(ValueError) as e:
      train(tiny(), workdir)
    assert str(e.value) == (
        f"--workdir {workdir} is in use by another train.py run (pid 123 on elsewhere); wait "
        "for it to end (or stop it), or give another --workdir"
    )
  assert train(tiny(), workdir).step == STEPS  # released: the same command resumes (at the end)
  with open(workdir / loop.LOCK_FILE) as lock:
    assert lock.read() == f"pid {os.getpid()} on {socket.gethostname()}"
  missing = {"data.source": "folder", "data.root": str(tmp_path / "no_data")}
  with pytest.raises(data.DataNotFoundError, match="no_data/train is not a directory"):
    train(tiny(**missing), tmp_path / "new")  # fails with the lock held
  assert not os.path.exists(tmp_path / "new")  # a failed start leaves no workdir


def test_a_failed_start_removes_the_folders_it_made(tmp_path):
  """A failed start leaves nothing behind: the missing folders above its workdir, which it made
  with it, go too (runs/a of runs/a/b stayed); the folders that were there stay."""
  missing = {"data.source": "folder", "data.root": str(tmp_path / "no_data")}
  (tmp_path / "runs").mkdir()
  with pytest.raises(data.DataNotFoundError, match="no_data/train is not a directory"):
    train(tiny(**missing), tmp_path / "runs" / "a" / "b")
  assert os.listdir(tmp_path) == ["runs"] and os.listdir(tmp_path / "runs") == []
  # A workdir whose name is too long: os.makedirs made only the folders above it, which go too.
  with pytest.raises(data.DataNotFoundError, match="no_data/train is not a directory"):
    train(tiny(**missing), tmp_path / "runs" / "a" / ("x" * 300))
  assert os.listdir(tmp_path / "runs") == []


def test_a_failed_start_removes_the_compilation_cache_it_began(tmp_path, monkeypatch):
  """JAX makes train.py's WORKDIR/compilation_cache at the first compile, which can come before a
  check fails: a failed start left it in a folder that was there before (seen: an empty
  compilation_cache/ in a folder of one's own). Removed, JAX's cache is reset: a later compile of
  the process (a retry) makes it again instead of warning that it cannot write there. A cache that
  was there before stays."""
  workdir = tmp_path / "mine"
  cache = workdir / reporting.COMPILATION_CACHE
  programs = itertools.count()

  def open_data(*_):
    jax.jit(lambda x: x + next(programs))(jnp.ones(3)).block_until_ready()  # a new program
    assert os.listdir(cache)  # JAX wrote it to the workdir's cache
    raise data.DataNotFoundError("no data")

  monkeypatch.setattr(tasks.classification.Classification, "train_loader", open_data)
  chosen = (
      jax.config.jax_compilation_cache_dir,
      jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  workdir.mkdir()
  try:
    jax.config.update("jax_compilation_cache_dir", str(cache))  # train.py's (cli)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    with pytest.raises(data.DataNotFoundError):
      train(tiny(), workdir)
    assert os.listdir(workdir) == []
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # "Error writing persistent compilation cache entry"
      jax.jit(lambda x: x * 3.25)(jnp.ones(3)).block_until_ready()
    before = set(os.listdir(cache))
    assert before
    with pytest.raises(data.DataNotFoundError):
      train(tiny(), workdir)
    assert before < set(os.listdir(cache))
  finally:
    jax.config.update("jax_compilation_cache_dir", chosen[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", chosen[1])
    compilation_cache.reset_cache()


def test_a_run_of_another_process_count_is_not_resumed(reference, tmp_path):
  """Each process saves its own train iterator position: a resume needs as many processes."""
  workdir = shutil.copytree(reference, tmp_path / "w")
  states = workdir / str(STEPS) / "data_iterator"
  (states / "process_0-of-1.json").rename(states / "process_0-of-2.json")
  shutil.copy(states / "process_0-of-2.json", states / "process_1-of-2.json")
  with pytest.raises(checkpoint.CheckpointError) as e:
    train(tiny(), workdir)
  assert str(e.value) == (
      f"{workdir} step {STEPS} was saved by a run of 2 processes, each with its own position in "
      "the train data; resume it with 2 processes (this run has 1; the number of devices per "
      "process may change)"
  )


@pytest.mark.parametrize(
    "found, model, fix",
    [
        ("fpn_fec_small", "fec_small", "a classifier starts from a classifier: give a fec_small"),
        ("fec_small_det", "fec_small", "a classifier starts from a classifier: give a fec_small"),
        (
            "fec_base",
            "fpn_fec_small",
            "fpn_fec_small starts from fec_small (an ImageNet classifier), fec_small_seg (a dense "
            "backbone) or fpn_fec_small; or set --config.model.name",
        ),
    ],
)
def test_init_from_of_another_model_says_what_the_config_starts_from(found, model, fix):
  assert loop._init_from_fix(found, model).startswith(fix)


@pytest.mark.parametrize(
    "saved, wanted, fits",
    [
        ("fpn_fec_small", "fec_small", False),  # a classifier starts from a classifier
        ("fec_small", "fec_base", False),
        ("fec_small", "fpn_fec_small", True),  # a segmenter starts from its backbone's classifier
        ("fec_small", "fec_small", True),  # of other classes: the head is re-initialized
    ],
)
def test_a_workdir_of_another_model_offers_init_from_where_it_fits(saved, wanted, fits, tmp_path):
  """resumable_step reads a run's model item and item names only: weights and the folders of
  the training items stand in for a run."""
  shapes = variable_shapes(fec_jax.create_model(saved, num_classes=3))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # save_params checks them
  checkpoint.save_params(
      str(tmp_path), variables["params"], saved, {"num_classes": 3}, variables.get("batch_stats")
  )
  for item in (checkpoint.OPT_STATE_ITEM, checkpoint.PROGRESS_ITEM, checkpoint.DATA_ITER_ITEM):
    os.makedirs(tmp_path / "0" / item)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.resumable_step(str(tmp_path), wanted, {"num_classes": 5}, ema=False)
  fine_tune = f" (--config.init_from={tmp_path} to fine-tune from it)" if fits else ""
  assert str(e.value).endswith(f"or start a new --workdir{fine_tune}"), e.value


def test_a_resume_may_change_where_to_stop_how_often_to_log_and_how_to_evaluate(reference):
  config = tiny(max_steps=99, log_every_steps=5, eval_every_steps=7, **{"data.num_workers": 2})
  with config.unlocked():
    config.data.crop_pct = 0.875  # one of the task's EVALUATION_ONLY fields
  evaluation_only = tasks.get(config).EVALUATION_ONLY
  loop._check_same_run(config, str(reference), evaluation_only)  # raises for others (below)
  with pytest.raises(checkpoint.CheckpointError, match=r"data.crop_pct 1.0 \(now 0.875\)"):
    loop._check_same_run(config, str(reference), frozenset())  # another task's fields
  assert reporting.read_config(str(reference)) == json.loads(tiny().to_json())


def same_run(config, workdir: str) -> dict | None:
  """A resume's checks of its config and of its data's label names (loop._start's), without a
  checkpoint; returns the run's config.json."""
  saved = loop._check_same_run(config, workdir, frozenset())
  loop._check_same_labels(config, workdir, tasks.get(config).data_label_names(), saved)
  return saved


def test_a_resume_from_another_data_root_needs_the_runs_class_folders(tmp_path):
  """data.root may change on a resume (the data moved), but labels index the train class
  folders: a root whose folders differ from those of the run's root, where that is still there
  (a run of an earlier fec-jax, without classes.json), would go on with other classes under the
  run's labels, and stops before anything is read."""
  run_root = make_imagenet_folder(tmp_path / "my run")  # a space: the advice quotes the root
  shutil.copytree(run_root, tmp_path / "copy")
  shutil.copytree(run_root, tmp_path / "other")
  first, renamed = sorted(os.listdir(tmp_path / "other" / "train"))[0], "a_renamed"
  os.rename(tmp_path / "other" / "train" / first, tmp_path / "other" / "train" / renamed)
  folder = lambda root: tiny(**{"data.source": "folder", "data.root": str(root)})
  workdir = str(tmp_path / "w")
  reporting.write_config(workdir, folder(run_root))
  same_run(folder(tmp_path / "copy"), workdir)  # the same classes
  with pytest.raises(checkpoint.CheckpointError) as e:
    same_run(folder(tmp_path / "other"), workdir)
  assert str(e.value) == (
      f"--workdir {workdir} holds a run whose labels index other classes: label 0 is "
      f"'{renamed}' in the class folders in {tmp_path / 'other' / 'train'} now, "
      f"'{first}' in the class folders in {tmp_path / 'my run' / 'train'} when the run started. "
      f"Resume it with its data ('--config.data.root={run_root}'), or start a new --workdir "
      f"(--config.init_from={workdir} to start from its weights)"
  )
  shutil.rmtree(run_root)  # moved away: nothing to compare the new root with
  same_run(folder(tmp_path / "other"), workdir)


def test_a_resume_after_a_class_folder_was_renamed_in_place_stops_before_the_compile(
    reference, tmp_path
):
  """Labels index the train class folders sorted by name: 'Dog' renamed 'dog' in the same root
  reorders them, and the run would go on with its labels naming other classes. The names the
  run started with (classes.json) stop it before anything is read or compiled; a run without
  them (of an earlier fec-jax) resumes as before."""
  root = tmp_path / "pets"
  for name in ("Dog", "cat", "eel"):
    (root / "train" / name).mkdir(parents=True)
  config = tiny(**{"data.source": "folder", "data.root": str(root)})
  workdir = shutil.copytree(reference, tmp_path / "w")  # its checkpoints, as a folder run's
  reporting.write_config(str(workdir), config)
  reporting.write_classes(str(workdir), tasks.get(config).data_label_names())
  assert reporting.read_classes(str(workdir)) == (
      ("Dog", "cat", "eel"),
      f"class folders in {root / 'train'}",
  )
  same_run(config, str(workdir))
  os.rename(root / "train" / "Dog", root / "train" / "dog")  # now after 'cat'
  with pytest.raises(checkpoint.CheckpointError) as e:
    train(config, workdir)
  assert str(e.value) == (
      f"--workdir {workdir} holds a run whose labels index other classes: label 0 is 'cat' in "
      f"the class folders in {root / 'train'} now, 'Dog' when the run started "
      f"({workdir / reporting.CLASSES_FILE}). Resume it with the names its classes had when it "
      f"started, or start a new --workdir (--config.init_from={workdir} to start from its "
      "weights)"
  )
  assert losses(workdir) == losses(reference)  # nothing was trained
  (workdir / reporting.CLASSES_FILE).write_text('["Dog"]')
  with pytest.raises(ValueError, match=r'classes.json holds \["Dog"\]; expected \{"origin"'):
    same_run(config, str(workdir))
  (workdir / reporting.CLASSES_FILE).unlink()  # a run of an earlier fec-jax: nothing to compare
  assert same_run(config, str(workdir))["data"]["root"] == str(root)


def test_a_resume_without_a_data_root_is_not_compared_with_the_working_directory(
    tmp_path, monkeypatch
):
  """A resume that leaves data.root '' reads no folder (the data's own error says so when it
  opens): a train/ in the working directory, with other class folders, is not compared with the
  run's root as if it were the resume's data."""
  run_root = make_imagenet_folder(tmp_path / "run")
  shutil.copytree(run_root, tmp_path / "here")
  first = sorted(os.listdir(tmp_path / "here" / "train"))[0]
  os.rename(tmp_path / "here" / "train" / first, tmp_path / "here" / "train" / "a_renamed")
  folder = lambda root: tiny(**{"data.source": "folder", "data.root": str(root)})
  workdir = str(tmp_path / "w")
  reporting.write_config(workdir, folder(run_root))
  monkeypatch.chdir(tmp_path / "here")
  assert same_run(folder(""), workdir)["data"]["root"] == run_root
  reporting.write_classes(workdir, data.label_names(folder(run_root).data))  # recorded: the same
  assert same_run(folder(""), workdir)["data"]["root"] == run_root


def test_a_resume_with_another_number_of_loader_workers_continues_the_run(reference, tmp_path):
  """The reference trained in-process; resumed at step 4 with 2 loader worker processes, steps
  5 and 6 are the reference's: the batches do not depend on the workers. config.json records
  the worker count, so that train.py --workdir=DIR alone goes on with it, but not the init_from
  that a resume does not read."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / str(STEPS))
  assert saved_steps(workdir) == [4]
  result = train(tiny(**{"data.num_workers": 2, "init_from": str(tmp_path / "unread")}), workdir)
  assert result.step == STEPS
  assert losses(workdir) == losses(reference)  # bit-identical
  expected = reporting.config_data(tiny(**{"data.num_workers": 2}))
  assert reporting.read_config(str(workdir)) == expected


def test_a_field_json_cannot_hold_neither_stops_a_run_nor_its_resume(tmp_path):
  """A field of the user's own: an object (saved as its repr, with an address), NaN; a dict
  with keys that are not strings leaves no config.json at all."""
  config, again = tiny(), tiny()
  for c in (config, again):
    with c.unlocked():
      c.mine, c.nan = object(), float("nan")
  reporting.write_config(str(tmp_path), config)
  assert "unserializable object" in (tmp_path / reporting.CONFIG_FILE).read_text()
  loop._check_same_run(again, str(tmp_path), frozenset())
  again.seed = 1
  with pytest.raises(checkpoint.CheckpointError, match=r"seed 0 \(now 1\)"):
    loop._check_same_run(again, str(tmp_path), frozenset())
  with config.unlocked():
    config.table = {(1, 2): 3}
  reporting.write_config(str(tmp_path / "w"), config)
  assert not (tmp_path / "w").exists()


def test_a_field_of_ones_own_added_or_left_out_on_a_resume_is_a_change(tmp_path):
  """A field that only one of the two configs has is named, as absent on one side; the fields
  of reporting._ADDED_LATER, which a config.json of an earlier fec-jax lacks, are not."""
  older = reporting.config_data(tiny())
  del older["init_from_step"]
  (tmp_path / reporting.CONFIG_FILE).write_text(json.dumps(older))
  loop._check_same_run(tiny(), str(tmp_path), frozenset())
  added = tiny()
  with added.unlocked():
    added.pos_weight = 2.0
  with pytest.raises(checkpoint.CheckpointError) as e:
    loop._check_same_run(added, str(tmp_path), frozenset())
  assert "another config: pos_weight absent (now 2.0). Resume it with its values (without " in str(
      e.value
  )
  loop._check_same_run(added, str(tmp_path), frozenset({"pos_weight"}))  # EVALUATION_ONLY
  reporting.write_config(str(tmp_path), added)
  with pytest.raises(checkpoint.CheckpointError) as e:
    loop._check_same_run(tiny(), str(tmp_path), frozenset())
  assert (
      "pos_weight 2.0 (now absent). Resume it with its values (config.pos_weight = 2.0 in the "
      "config file (with config.unlocked())), or start" in str(e.value)
  ), e.value


class _ArrayMetrics(classification.Classification):
  """Classification whose evaluator returns its metrics as JAX arrays, as a task of one's own
  might (a jnp.mean)."""

  def evaluator(self, model, mesh, compiler_options=None):
    inner = super().evaluator(model, mesh, compiler_options)

    class Arrays(tasks.Evaluator):

      def evaluate(self, variable_sets, per_class=False, **kwargs):
        results = inner.evaluate(variable_sets, per_class, **kwargs)
        return [{k: jnp.asarray(v) for k, v in m.items()} for m in results]

    return Arrays()


def test_a_registered_task_trains_and_its_metrics_are_numbers(reference, tmp_path, monkeypatch):
  """A task of one's own, made known with tasks.register, trains like the built-in one (here
  the same steps: the reference's losses), and its evaluator's 0-d arrays (float32 here) are
  recorded as numbers."""
  monkeypatch.setattr(tasks, "_REGISTERED", {})
  tasks.register("array_metrics", _ArrayMetrics)
  result = train(tiny(task="array_metrics"), tmp_path)
  assert result.step == STEPS and losses(tmp_path) == losses(reference)
  record, expected = (
      reporting.read_metrics(str(tmp_path))[-1],
      reporting.read_metrics(reference)[-1],
  )
  assert record["val_top1"] == pytest.approx(expected["val_top1"], rel=1e-6)
  assert isinstance(record["val_images"], int) and record["val_images"] == expected["val_images"]
  assert reporting.read_config(str(tmp_path))["task"] == "array_metrics"


class _PlainLoader(classification.Classification):
  """Classification whose train_loader gives its batches by a generator (no get_state): a task
  of one's own that reads its data in plain Python."""

  closed = []

  def train_loader(self, process_index, process_count):
    loader, steps = super().train_loader(process_index, process_count)

    def batches():
      try:
        yield from loader
      finally:
        loader.close()
        _PlainLoader.closed.append(True)

    generator = batches()
    next(generator)  # started: its finally runs when it is closed
    return generator, steps


def test_a_train_loader_that_the_checkpoints_cannot_save_is_named_before_the_compile(
    tmp_path, monkeypatch
):
  """A generator trained up to the first checkpoint, which then failed in Orbax's thread with
  "'generator' object has no attribute 'get_state'" (and left a step's temporary directory)."""
  monkeypatch.setattr(tasks, "_REGISTERED", {})
  tasks.register("plain", _PlainLoader)
  compiled = []
  monkeypatch.setattr(loop, "_run", lambda *args: compiled.append(True))
  with pytest.raises(tasks.TrainLoaderError) as e:
    train(tiny(task="plain"), tmp_path / "w")
  assert str(e.value).startswith(
      "_PlainLoader.train_loader returned a generator without get_state, set_state; expected (a "
      "grain iterator, steps per epoch): the checkpoints save the iterator's position with its "
      "get_state()"
  )
  assert not compiled and _PlainLoader.closed == [True]


class _DataLoaderTask(classification.Classification):
  """Classification whose train_loader is an iterator of grain.DataLoader, which has get_state
  and set_state (the checkpoints save and restore it) but no close()."""

  def train_loader(self, process_index, process_count):
    import grain

    examples = [{"image": np.zeros((32, 32, 3), np.uint8), "label": np.int32(0)}] * 8
    sampler = grain.samplers.IndexSampler(
        len(examples), shard_options=grain.sharding.NoSharding(), num_epochs=None
    )
    loader = grain.DataLoader(
        data_source=examples,
        sampler=sampler,
        operations=[grain.transforms.Batch(self.config.global_batch_size)],
        worker_count=0,
    )
    return iter(loader), 1


def test_a_grain_dataloader_iterator_trains_without_a_close(tmp_path, monkeypatch):
  # the loop's finally called train_iter.close(): AttributeError 'DataLoaderIterator' object has
  # no attribute 'close', after the whole run
  monkeypatch.setattr(tasks, "_REGISTERED", {})
  tasks.register("dataloader", _DataLoaderTask)
  monkeypatch.setattr(loop, "_run", lambda *args: "trained")
  assert train(tiny(task="dataloader"), tmp_path / "w") == "trained"


def test_tasks_register_takes_a_task_class_under_a_new_name(monkeypatch):
  monkeypatch.setattr(tasks, "_REGISTERED", {})
  with pytest.raises(ValueError, match=r"fec_jax.tasks.register\('mine', YourTask\) first"):
    tasks.get(tiny(task="mine"))
  tasks.register("mine", _ArrayMetrics)
  assert type(tasks.get(tiny(task="mine"))) is _ArrayMetrics
  with pytest.raises(TypeError, match="expected a subclass of fec_jax.tasks.Task"):
    tasks.register("other", object)
  with pytest.raises(ValueError, match="'classification' is a task of fec-jax"):
    tasks.register("classification", _ArrayMetrics)


def test_a_config_that_is_no_configdict_is_named(tmp_path):
  # a dict failed with "'dict' object has no attribute 'task'"
  with pytest.raises(TypeError, match=r"config is an ml_collections.ConfigDict .*, got a dict$"):
    loop.train_and_evaluate(tiny().to_dict(), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_an_empty_workdir_is_named(tmp_path, monkeypatch):
  # '' was FileNotFoundError "[Errno 2] No such file or directory: ''" from the lock
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"^workdir is ''; expected the path of the run's dir"):
    loop.train_and_evaluate(tiny(), "")
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("workdir", ["~", "~/runs", "~root/runs", "~no_such_user_fec/runs"])
def test_a_workdir_with_an_unexpanded_home_is_refused(
    workdir, tmp_path, monkeypatch, data_not_opened
):
  # '~/runs' trained in a folder '~' of the current directory (the CLI refuses it, as a shell
  # expands '~' at a word's start only); a '~name' of no user is a name, as for the CLI
  monkeypatch.chdir(tmp_path)
  home = workdir.split("/")[0]
  expected = (
      f"workdir '{workdir}' starts with '{home}', which Python does not expand: it would be a "
      f"folder '{home}' in the current directory; expand it first (os.path.expanduser: "
      f"'{os.path.expanduser(workdir)}')"
  )
  if home == "~no_such_user_fec":  # taken as it is, up to the data
    with pytest.raises(AssertionError, match="the data was opened"):
      loop.train_and_evaluate(tiny(), workdir)
    return
  with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
    loop.train_and_evaluate(tiny(), workdir)
  assert not os.listdir(tmp_path)


def test_a_fresh_run_in_a_folder_of_other_files_stops_before_the_data(tmp_path, data_not_opened):
  """A folder of one's own given as the workdir (data, notes, the repository) got the run's
  checkpoints and records among its files, a config.json of its own overwritten. What a run
  writes there (an interrupted one before its first checkpoint, say), another run's workdir and
  hidden files pass; a file with a step's number is no step, a config.json no run's config."""
  workdir = tmp_path / "photos"
  for name in ("cats/a.jpg", "config.json", "notes.txt", "x/y", "z/w", ".hidden", "2024"):
    (workdir / name).parent.mkdir(parents=True, exist_ok=True)
    (workdir / name).write_text("mine")
  with pytest.raises(ValueError) as e:
    train(tiny(), workdir)
  assert str(e.value) == (
      f"--workdir {workdir} holds files that no train.py run writes (2024, cats/, config.json "
      "and 3 more), and no run to resume: a new run would write its checkpoints and records "
      "among them; give a new or empty folder as --workdir"
  )
  assert (workdir / "config.json").read_text() == "mine"
  assert not os.path.exists(workdir / loop.LOCK_FILE)  # the failed start left no lock file there
  for settings in ('{"name": "my project"}', "[1, 2]", "{"):  # a config.json alone, no run's
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "config.json").write_text(settings)
    with pytest.raises(
        ValueError, match=r"holds files that no train.py run writes \(config.json\)"
    ):
      train(tiny(), project)
    assert (project / "config.json").read_text() == settings
  interrupted = tmp_path / "interrupted"
  run_config = json.dumps({"model": {"name": "fec_small"}})
  for name in (
      "config.json",
      "config.json.tmp",  # a kill (or a full disk) between its write and its rename
      "classes.json",
      "metrics.jsonl",
      "curves.png",
      "tensorboard/events",
      "compilation_cache/x",
      "2.orbax-checkpoint-tmp-1733580000/x",
      ".notes",
      "ablation/config.json",  # a run's workdir inside it
  ):
    (interrupted / name).parent.mkdir(parents=True, exist_ok=True)
    (interrupted / name).write_text(run_config if name.endswith("config.json") else "")
  with pytest.raises(AssertionError, match="the data was opened"):
    train(tiny(), interrupted)


def test_every_process_stops_where_one_finds_another_workdir(tmp_path, monkeypatch):
  """Each process reads the workdir at its start: one that found files of one's own there (a disk
  of its host's own) stopped alone, and the others went on and waited for it in a collective for
  ever (two train.py processes, one of them seeing a file there: both still waiting after 300 s).
  The processes gather the step each resumes and whether its fresh-workdir check failed, and all
  stop together; the run of processes that agree starts."""
  from jax.experimental import multihost_utils

  config = tiny()
  task = tasks.get(config)
  workdir = tmp_path / "w"
  gathered, other = [], [-1, 0]  # process 1's: the step it resumes (-1: none), whether it failed
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(
      multihost_utils,
      "process_allgather",
      lambda own: gathered.append(own.tolist()) or np.stack([own, np.array(other, own.dtype)]),
  )
  assert loop._start(config, str(workdir), task).resume is None
  assert gathered == [[-1, 0]]
  other[1] = 1  # process 1 found files that no run writes
  with pytest.raises(ValueError) as e:
    loop._start(config, str(workdir), task)
  assert str(e.value) == (
      f"on process 1, --workdir {workdir} holds files that no train.py run writes (its error line "
      "names them), and no run to resume: give a new or empty folder as --workdir, one that every "
      "process shares"
  )
  other[:] = [4, 0]  # process 1 found a run to resume
  with pytest.raises(ValueError) as e:
    loop._start(config, str(workdir), task)
  assert str(e.value) == (
      f"process 1 finds a run to resume at step 4 in --workdir {workdir}, process 0 no run: every "
      "process reads and writes the workdir, so give a folder that they all share (not one on a "
      "disk of each host's own)"
  )
  other[:] = [-1, 0]
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  monkeypatch.setattr(checkpoint, "resumable_step", lambda *args: None)  # Orbax's, of 1 process
  with pytest.raises(ValueError, match=r"holds files that no train.py run writes \(notes.txt\)"):
    loop._start(config, str(workdir), task)  # its own error, after the gather
  assert gathered[-1] == [-1, 1]


def test_every_process_stops_where_one_cannot_read_the_workdir(tmp_path, monkeypatch):
  """A process that stops at what it reads in the workdir (a run of another model, a step it
  cannot read, on a disk of its host's own) stops after the gather too: it stopped alone before
  it, and the others waited for it there for ever."""
  from jax.experimental import multihost_utils

  config = tiny()
  task = tasks.get(config)
  workdir = tmp_path / "w"
  gathered, other = [], [-1, 2]  # process 1 failed to read the workdir
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(
      multihost_utils,
      "process_allgather",
      lambda own: gathered.append(own.tolist()) or np.stack([own, np.array(other, own.dtype)]),
  )
  with pytest.raises(ValueError) as e:
    loop._start(config, str(workdir), task)
  assert str(e.value) == (
      f"on process 1, reading --workdir {workdir} failed (its error line says why): every process "
      "reads the workdir at its start, so give a folder that they all share"
  )
  assert gathered == [[-1, 0]]
  other[1] = 0

  def unreadable(*args):
    raise checkpoint.CheckpointError(f"{workdir}/4 cannot be read")

  monkeypatch.setattr(checkpoint, "resumable_step", unreadable)
  with pytest.raises(checkpoint.CheckpointError, match="/4 cannot be read$"):
    loop._start(config, str(workdir), task)  # its own error, after the gather
  assert gathered[-1] == [-1, 2]


def test_mixup_on_an_odd_batch_per_device_stops_before_the_data(tmp_path, data_not_opened):
  config = tiny(global_batch_size=5, **{"data.mixup_alpha": 0.8})
  with pytest.raises(ValueError, match=r"^config.global_batch_size 5 over 1 device is 5 images"):
    train(config, tmp_path / "w")
  assert not os.listdir(tmp_path)


def test_a_checkpoint_with_an_unexpanded_home_says_so(tmp_path, monkeypatch):
  # it said only "does not exist", naming <current directory>/~/runs/x
  monkeypatch.chdir(tmp_path)
  with pytest.raises(checkpoint.CheckpointError) as e:
    fec_jax.load_pretrained("~/runs/x")
  assert str(e.value) == (
      f"checkpoint directory {tmp_path}/~/runs/x does not exist ('~' is not expanded here: "
      "os.path.expanduser); expected the --output of convert_torch_weights.py or a train.py "
      "--workdir"
  )
  with pytest.raises(checkpoint.CheckpointError, match=f"^config.init_from {tmp_path}/~/c does"):
    train(tiny(init_from="~/c"), tmp_path / "w")


def test_tasks_register_takes_a_name_that_config_task_can_give(monkeypatch):
  # register(3, ...) was taken, and then every config.task typo was "'<' not supported between
  # instances of 'int' and 'str'" from get()'s list of the tasks
  monkeypatch.setattr(tasks, "_REGISTERED", {})
  for name in (3, "", None):
    with pytest.raises(TypeError, match=r"expected a name, a non-empty str for config.task"):
      tasks.register(name, _ArrayMetrics)
  with pytest.raises(ValueError, match=r"config.task 'mine' is not a task; choose one of"):
    tasks.get(tiny(task="mine"))


@pytest.mark.parametrize(
    "results, problem",
    [
        ({"top1": 1.0}, "returned dict {'top1': 1.0}; expected a list of 1 dict, one"),
        ([{"top1": 1.0}, {"top1": 2.0}], "returned list"),
        (["top1"], "returned a str in its list"),
        ([{"top1": np.zeros(2)}], "returned 'top1': ndarray of shape (2,); expected"),
        ([{"top1": "76%"}], "returned 'top1': str; expected"),
        ([{"top1": True}], "returned 'top1': bool; expected"),
        ([{"top1": np.complex64(1)}], "returned 'top1': complex64 of shape (); expected"),
    ],
)
def test_an_evaluators_result_of_another_form_is_named(results, problem):
  class Mine(tasks.Evaluator):

    def evaluate(self, variable_sets, per_class=False, **kwargs):
      return results

  with pytest.raises(TypeError) as e:
    Mine()({})
  assert str(e.value).startswith("Mine.evaluate ") and problem in str(e.value), e.value
  table = {"IoU": np.zeros(3)}
  half = jnp.bfloat16(0.5)  # the configs' compute dtype
  assert tasks.checked_metrics(Mine(), [{"x": half, "n": np.int64(2)}], 1) == [{"x": 0.5, "n": 2}]
  checked = tasks.checked_metrics(
      Mine(), [{"n": np.int32(3), "x": jnp.float32(0.5), "per_class": table}], 1
  )
  assert checked == [{"n": 3, "x": 0.5, "per_class": table}]
  assert type(checked[0]["n"]) is int and type(checked[0]["x"]) is float


def test_an_evaluator_without_per_class_metrics_asked_for_them_is_named():
  """eval.py --per_class on a task of one's own whose evaluator makes no per-class table: a
  KeyError 'per_class' in eval.py before; now the evaluator is named (one error line)."""

  class Mine(tasks.Evaluator):

    def __init__(self, metrics):
      self.metrics = metrics

    def evaluate(self, variable_sets, per_class=False, **kwargs):
      return [self.metrics]

  assert Mine({"top1": 1.0})({}) == {"top1": 1.0}
  for metrics in ({"top1": 1.0}, {"top1": 1.0, "per_class": None}):
    with pytest.raises(tasks.MetricsError) as e:
      Mine(metrics)({}, per_class=True)
    assert str(e.value).startswith(
        f"Mine.evaluate returned {sorted(metrics)} with per_class, without a 'per_class' dict"
    ) and str(e.value).endswith("or leave out per_class (eval.py --per_class)"), e.value
  assert issubclass(tasks.MetricsError, TypeError)  # what the loop's evaluations raised before


def test_a_batch_evaluator_runs_a_step_of_ones_own_over_any_batches():
  """tasks.BatchEvaluator on a list of batches (no close()), a step and a summary of one's own;
  an empty split is the error without a data config to name."""

  def step(variables, batch, per_class):
    x = jnp.where(batch["mask"], batch["x"], 0) * variables["w"]  # padding left out
    return {"count": jnp.sum(batch["mask"]), "x": jnp.sum(x)}

  summarize = lambda sums, per_class: {"mean": float(sums["x"] / sums["count"])}
  mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  batch = {"x": np.arange(8, dtype=np.float32), "mask": np.arange(8) < 6}
  evaluator = tasks.BatchEvaluator([batch, batch], 2, step, summarize, mesh, None)
  assert evaluator({"w": np.float32(2)}) == {"mean": 2 * 2 * 15 / 12}
  with pytest.raises(data.DataNotFoundError, match="no readable val image in the val data"):
    tasks.BatchEvaluator([], 0, step, summarize, mesh, None)({"w": np.float32(2)})


def test_a_batch_evaluators_metric_of_another_form_names_its_summarize():
  def step(variables, batch, per_class):
    return {"count": jnp.sum(batch["mask"]), "hits": jnp.sum(batch["x"], axis=0)}  # [2]

  def per_attribute(sums, per_class):
    return {"hits": sums["hits"] / sums["count"]}  # [2], not a number

  mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  batch = {"x": np.ones((8, 2), np.float32), "mask": np.ones(8, bool)}
  evaluator = tasks.BatchEvaluator([batch], 1, step, per_attribute, mesh, None)
  with pytest.raises(TypeError) as e:
    evaluator({})
  assert str(e.value).startswith(
      "BatchEvaluator.evaluate (summarize test_a_batch_evaluators_metric_of_another_form_names_its_"
      "summarize.<locals>.per_attribute) returned 'hits': ndarray of shape (2,); expected"
  ), e.value


@pytest.fixture
def data_not_opened(monkeypatch):
  """A test failure where the run opens its train data."""

  def open_data(*_):
    raise AssertionError("the data was opened")

  monkeypatch.setattr(tasks.classification.Classification, "train_loader", open_data)


@pytest.mark.parametrize(
    "case,expected",
    [
        (
            "other_model",
            "holds a run started with another config: model.name 'fec_small' (now 'fec_base'). "
            "Resume it with its values (--config.model.name=fec_small), or start a new --workdir",
        ),
        (
            "weights_only",
            "holds weights (step 0: ['checksums', 'model', 'params']), not a train.py run",
        ),
        ("no_ema", "kept no EMA weights; resume it with --config.ema_decay=0"),
        (
            "other_config",
            "holds a run started with another config: base_lr 0.008 (now 0.1), global_batch_size "
            "8 (now 16). Resume it with its values (--config.base_lr=0.008 "
            "--config.global_batch_size=8), or start a new --workdir",
        ),
        ("init_from_no_ema", "holds no EMA weights (a converter output"),
        ("file", "is a file; expected a directory"),
        ("under_a_file", "is a file; expected a directory"),
        ("broken_link", "is not a directory; expected a directory"),
        (
            "numbered_in_a_workdir",  # the run would take it for its step 7 (and did)
            "w/7 would be taken for step 7 of the checkpoint {tmp}/w (its steps are its numbered "
            "directories): give the output a name that is not a number",
        ),
        ("in_a_step", "/mine is inside the checkpoint {tmp}/w: write it outside the"),
    ],
)
def test_a_workdir_or_init_from_that_does_not_fit_stops_before_the_data(
    case, expected, reference, tmp_path, data_not_opened, caplog
):
  """Checked from the checkpoints' model item and item names, before the data is opened."""
  workdir, config = tmp_path / "w", tiny()
  if case in ("other_model", "no_ema", "other_config"):
    shutil.copytree(reference, workdir)
  if case == "other_model":
    config.model.name = "fec_base"
  if case == "other_config":  # and fields a resume may change
    config = tiny(base_lr=0.1, global_batch_size=16, max_steps=99, **{"data.num_workers": 2})
  if case == "no_ema":
    shutil.rmtree(workdir / str(saved_steps(workdir)[-1]) / checkpoint.EMA_PARAMS_ITEM)
  if case in ("weights_only", "init_from_no_ema"):
    model, variables = fec_jax.load_pretrained(reference)
    converted = tmp_path / "converted"
    checkpoint.save_params(str(converted), variables["params"], "fec_small", {"num_classes": 10})
    workdir = converted if case == "weights_only" else workdir
    config.init_from, config.init_from_ema = str(converted), case == "init_from_no_ema"
  if case in ("file", "under_a_file"):
    workdir.write_text("not a directory")
    workdir = workdir / "sub" if case == "under_a_file" else workdir
  if case == "broken_link":  # it failed in etils' makedirs, after the state was made
    workdir.symlink_to(tmp_path / "gone")
  if case in ("numbered_in_a_workdir", "in_a_step"):  # a new run in another run's directories
    shutil.copytree(reference, workdir)
    config.init_from = str(workdir)  # it failed loading it, naming the new run as its step 7
    step = str(saved_steps(workdir)[0])
    workdir = workdir / "7" if case == "numbered_in_a_workdir" else workdir / step / "mine"
  with (
      caplog.at_level(logging.INFO),
      pytest.raises(checkpoint.CheckpointError, match=re.escape(expected.format(tmp=tmp_path))),
  ):
    train(config, workdir)
  assert "without a lock" not in caplog.text  # a path that cannot hold it is no lock problem
  if case in ("numbered_in_a_workdir", "in_a_step"):
    assert not workdir.exists()  # nothing left behind in the other run


def test_a_resume_of_other_classes_names_the_config_fields_that_differ(
    reference, tmp_path, data_not_opened
):
  """A resume with another data.num_classes (data of another class count) builds another model
  than the run's: the error names the fields of its config.json that differ and the overrides
  that restore them, as for any other field, not the two models (without a config.json, of an
  earlier fec-jax, it still does); init_from is offered where the run's weights fit."""
  workdir = shutil.copytree(reference, tmp_path / "w")
  with pytest.raises(checkpoint.CheckpointError) as e:
    train(tiny(**{"data.num_classes": 5}), workdir)
  assert str(e.value) == (
      f"--workdir {workdir} holds a run started with another config: data.num_classes 10 (now "
      "5). Resume it with its values (--config.data.num_classes=10), or start a new --workdir "
      f"(--config.init_from={workdir} to start from its weights)"
  )
  with pytest.raises(checkpoint.CheckpointError) as e:
    train(tiny(**{"model.name": "fec_base", "data.num_classes": 5}), workdir)
  end = "(--config.data.num_classes=10 --config.model.name=fec_small), or start a new --workdir"
  assert str(e.value).endswith(end), e.value  # no init_from: fec_small's weights do not fit
  (workdir / reporting.CONFIG_FILE).unlink()
  with pytest.raises(checkpoint.OtherModel, match=r"num_classes 10\); the config asks for"):
    train(tiny(**{"data.num_classes": 5}), workdir)


@pytest.mark.parametrize("resume", [False, True])
def test_a_directory_where_config_json_goes_stops_before_the_data(
    resume, reference, tmp_path, data_not_opened
):
  workdir = tmp_path / "w"
  if resume:
    shutil.copytree(reference, workdir)
    (workdir / reporting.CONFIG_FILE).unlink()
  (workdir / reporting.CONFIG_FILE).mkdir(parents=True)
  expected = f"{workdir / reporting.CONFIG_FILE} is a directory; expected the config the run"
  with pytest.raises(ValueError, match=re.escape(expected)):
    train(tiny(), workdir)


def test_a_directory_where_classes_json_goes_stops_before_the_data(tmp_path, data_not_opened):
  """classes.json as a directory: a fresh start on class folders failed once compiled, writing it
  (IsADirectoryError, a traceback), and left its config.json; it stops before the data, as for
  config.json. Read back (a resume, eval.py, init_from) it is that error too, not no record."""
  root = make_imagenet_folder(tmp_path / "data", num_classes=3, per_class=1, size=(8, 8))
  config = tiny(**{"data.source": "folder", "data.root": root, "data.num_classes": 3})
  workdir = tmp_path / "w"
  (workdir / reporting.CLASSES_FILE).mkdir(parents=True)
  expected = (
      f"{workdir / reporting.CLASSES_FILE} is a directory; expected the names the run's labels "
      "had, a file"
  )
  with pytest.raises(ValueError) as e:
    train(config, workdir)
  assert str(e.value) == expected
  assert os.listdir(workdir) == [reporting.CLASSES_FILE]  # nothing written
  with pytest.raises(ValueError, match=re.escape(expected)):
    reporting.read_classes(str(workdir))


@pytest.mark.parametrize("case", ["missing", "empty", "num_classes", "image_size", "task"])
def test_bad_input_fails_before_compiling(case, tmp_path):
  root = tmp_path / "data"
  config = fec_base.get_config()
  config.data.root = str(root)
  if case == "empty":
    root.mkdir()
  if case == "num_classes":
    make_imagenet_folder(root, num_classes=3, per_class=1, val_per_class=1)
  if case == "image_size":
    config.data.image_size = 200
  if case == "task":
    config.task = "detection"
  error = ValueError if case in ("image_size", "task", "num_classes") else data.DataNotFoundError
  expected = {
      "missing": "expected a folder per class in <root>/train and <root>/val",
      "empty": "expected a folder per class in <root>/train and <root>/val",
      "num_classes": "num_classes is 1000",
      "image_size": "multiple of 32",
      "task": "not a task",
  }[case]
  start = time.perf_counter()
  with pytest.raises(error, match=expected):
    train(config, tmp_path / "w")
  assert time.perf_counter() - start < 30  # nothing was compiled
  assert not os.path.exists(tmp_path / "w")


def command_line(process: psutil.Process) -> str:
  try:
    return " ".join(process.cmdline())
  except psutil.Error:  # it ended meanwhile, or is a zombie
    return ""


def loader_workers(before: set[int]) -> list[psutil.Process]:
  """Child processes started since `before`, less multiprocessing's resource tracker (one per
  interpreter, it lives as long as the interpreter)."""
  return [
      p
      for p in psutil.Process().children(recursive=True)
      if p.pid not in before and "resource_tracker" not in command_line(p)
  ]


def test_no_loader_worker_outlives_the_run(tmp_path):
  before = {p.pid for p in psutil.Process().children(recursive=True)}
  seen, done = set(), threading.Event()

  def watch():  # the workers that exist during the run (train and val loaders)
    while not done.is_set():
      seen.update(p.pid for p in loader_workers(before))
      time.sleep(0.05)

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  result = train(tiny(max_steps=2, **{"data.num_workers": 2}), tmp_path / "w")
  done.set()
  watcher.join()
  assert result.step == 2
  assert len(seen) >= 2  # the loaders did start worker processes
  left = loader_workers(before)
  assert not left, [command_line(p) for p in left]
