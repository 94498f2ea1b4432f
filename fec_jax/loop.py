"""The task-neutral training loop: `train_and_evaluate(config, workdir)`.

  result = train_and_evaluate(config, workdir)   # train.py is this call and its error lines

The task (config.task, fec_jax.tasks) brings the model, data, loss and evaluator; the loop
brings what every task needs:
- a data-parallel mesh over all devices of all processes (fec_jax.training);
- a fresh start from config.seed, or from pretrained weights (config.init_from: a converter
  output or a train.py workdir; config.init_from_step and init_from_ema for another step and the
  EMA weights), or a resume from the latest checkpoint in the workdir (init_from is then not
  used): params, model state, optimizer state, EMA, step, RNG and the train iterator's position,
  bit-identical on one CPU device, with the config the run started with (config.json; only
  _FREE_ON_RESUME's fields and the task's EVALUATION_ONLY ones may change);
- periodic asynchronous checkpoints (a half-written one of a killed run is cleaned up);
- preemption: SIGTERM/SIGINT finish the step, checkpoint and return (fec_jax.preemption);
- a stop on a non-finite loss or gradient, keeping the last good checkpoint;
- metrics.jsonl, TensorBoard, curves.png and progress lines with throughput and ETA.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import time
import zlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache

from fec_jax import checkpoint, cli, data, reporting, tasks, training
from fec_jax.model import SEGMENTERS, classifiers, init_from_models
from fec_jax.model import model_name as name_of
from fec_jax.model import variable_shapes
from fec_jax.preemption import Preemption


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient norm; the message names the step and the last checkpoint."""


@dataclasses.dataclass
class RunResult:
  step: int  # optimizer steps done when the run returned
  preempted: bool  # stopped by SIGTERM/SIGINT; the same call resumes it
  record: dict[str, Any]  # the last metrics record written (empty if none)


@dataclasses.dataclass
class _Start:
  """Where a run starts, settled before anything slow: the model, and the step to resume from
  or the pretrained variables to start from (neither: a fresh start from config.seed)."""

  model: Any
  model_name: str
  overrides: dict[str, Any]  # create_model options stored in the checkpoints
  resume: int | None  # the workdir's latest step
  pretrained: dict[str, Any] | None  # config.init_from's variables, checked against the model
  source: str  # config.init_from, as the notes name it
  saved_config: dict | None  # a resumed run's config.json (None: a fresh start, an earlier fec-jax)
  labels: data.LabelNames | None = None  # the names the data gives its labels (the task's)


@dataclasses.dataclass
class _Run:
  """What the step loop works with, besides the state and the step function."""

  config: Any
  workdir: str
  train_iter: Any  # the task's checkpointable train iterator
  evaluator: tasks.Evaluator
  writer: reporting.MetricsWriter
  save: Callable[[training.TrainState], None]  # starts an asynchronous checkpoint of a state
  mngr: Any  # the orbax CheckpointManager
  preemption: Preemption
  mesh: Any
  steps_per_epoch: int
  num_steps: int
  # the record of the last step when a signal stopped the run there, before its evaluation
  unevaluated: dict[str, Any] | None = None


def train_and_evaluate(config, workdir: str, compiler_options: dict | None = None) -> RunResult:
  """Trains config.task's model with `config` in `workdir` (created, or resumed when it holds a
  checkpoint) and evaluates it every config.eval_every_epochs epochs (or
  config.eval_every_steps steps) and at the end.

  compiler_options: XLA options for the train and eval steps (e.g. the tests' faster CPU
  compile {'xla_backend_optimization_level': 0}).
  User errors (a bad config, missing data, an unfit init_from checkpoint) raise ValueError,
  fec_jax.data.DataNotFoundError or fec_jax.checkpoint.CheckpointError before the train step is
  compiled; a non-finite loss raises TrainingDiverged. A config that is no ConfigDict (a dict)
  is a TypeError.
  """
  if not isinstance(config, ml_collections.ConfigDict):  # a dict: "has no attribute 'task'"
    raise TypeError(
        f"config is an ml_collections.ConfigDict (a config file's get_config()), got a "
        f"{type(config).__name__}"
    )
  if not workdir:  # '' failed in the lock's os.makedirs: "No such file or directory: ''"
    raise ValueError(f"workdir is {workdir!r}; expected the path of the run's directory")
  home = cli.home_in(os.fspath(workdir))
  if home is not None:  # '~/runs' trained in a folder '~' of the current directory
    raise ValueError(
        f"workdir {workdir!r} starts with {home!r}, which Python does not expand: it would be a "
        f"folder {home!r} in the current directory; expand it first "
        f"(os.path.expanduser: {os.path.expanduser(workdir)!r})"
    )
  task = tasks.get(config)
  training.check_config(config, task.BATCHED_EVALUATION)
  task.check_config()
  task.check_training()
  _check_workdir_outside_data(config, workdir)
  if jax.process_count() > 1:
    _check_same_run_everywhere(config, workdir)
  with _hold(workdir), Preemption() as preemption:
    start = _start(config, workdir, task)
    # Then the data: a missing dataset or one that does not fit the config stops here.
    loaded = _timed(
        f"{config.task}: opening the train data",
        lambda: task.train_loader(jax.process_index(), jax.process_count()),
    )
    train_iter, steps_per_epoch = tasks.checked_loader(task, loaded)
    try:
      task.check_eval_data()  # held-out data the first evaluation would stop on stops here
      return _run(
          config, workdir, task, start, train_iter, steps_per_epoch, preemption, compiler_options
      )
    finally:
      if hasattr(train_iter, "close"):  # grain.DataLoader's iterator has none
        train_iter.close()  # ends the loader's worker processes


def _check_workdir_outside_data(config, workdir: str) -> None:
  """ValueError where workdir lies in a split folder of class-folder data (data.split_holding):
  the run would read its own files as data (its workdir a class of the split, that made the class
  count wrong; curves.png an image of the class folder it lies in, from the next start on)."""
  inside = data.split_holding(config.get("data") or {}, workdir)
  if inside is not None:
    split, folder = inside
    raise ValueError(
        f"--workdir {workdir} lies in the {split} split of config.data.root, {folder}: its "
        "folders are classes and its images examples, so the run would read its own files as "
        "data; give a --workdir outside the data's split folders"
    )


def _check_same_run_everywhere(config, workdir: str) -> None:
  """ValueError unless every process was given the same config and workdir: one started with
  other overrides would train with other values than the logs (process 0's) say, one with
  another workdir would fail inside Orbax. The error names what differs (the crc32 digests of
  the values are gathered from every process)."""
  fields = traverse_util.flatten_dict(reporting.config_data(config) or {}, sep=".")
  fields = {  # an object JSON cannot hold is written with its address, which differs
      f"config.{k}": "" if reporting.is_unserializable(v) else json.dumps(v)
      for k, v in sorted(fields.items())
  }
  differs = _differing(
      {
          "workdir": os.path.abspath(workdir),
          "config file": " ".join(fields),  # the same fields: then compare each
      }
  )
  if fields and not differs["config file"].any():
    differs.update(_differing(fields))
  others = np.flatnonzero(np.any(list(differs.values()), axis=0))  # the processes that differ
  if others.size:
    names = [name for name, d in differs.items() if d[others[0]]]
    raise ValueError(
        f"process {others[0]} was given another {reporting.listed(names, 5)} than process 0: "
        "give every process the same workdir and config (train.py: the same --workdir, --config "
        "and --config.* overrides)"
    )


def _differing(values: dict[str, str]) -> dict[str, np.ndarray]:
  """{name: bool [processes]}: where a process's value differs from process 0's (every process
  passes the same names)."""
  own = np.array([zlib.crc32(v.encode()) for v in values.values()], np.uint32)
  digests = np.asarray(multihost_utils.process_allgather(own)).reshape(-1, len(own))
  return dict(zip(values, (digests != digests[0]).T))


LOCK_FILE = ".lock"  # in the workdir: held by the run's process 0 (_hold)


@contextlib.contextmanager
def _hold(workdir: str):
  """Holds an exclusive lock on workdir/.lock while the run goes on (taken by process 0; every
  process learns the outcome), so that a second run on the same workdir stops at once instead of
  training beside the first and interleaving their records and checkpoints. fcntl.flock: released
  when the process ends, however it ends. A start that fails before the run records its config
  (config.json) leaves no trace: the lock file this creates is removed again (while still held:
  a run that opened it meanwhile finds it in use), and so are the compilation cache that JAX
  began meanwhile (train.py's, made at the first compile, which can come before a check fails)
  and a workdir this creates, with the missing folders above it that it made; a path that cannot
  hold the lock (a file, a read-only folder) is left for _start to refuse, and a filesystem
  without flock runs without the lock."""
  fd, created, lock_created, in_use, config_before = None, None, False, "", None
  lock = os.path.join(workdir, LOCK_FILE)
  config_file = os.path.join(workdir, reporting.CONFIG_FILE)
  cache = os.path.join(workdir, reporting.COMPILATION_CACHE)
  cache_created = False
  if jax.process_index() == 0:
    created = _outermost_missing(workdir)
    lock_created = not os.path.exists(lock)
    cache_created = not os.path.exists(cache)
    config_before = _file_version(config_file)
    try:
      os.makedirs(workdir, exist_ok=True)
      fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      in_use = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    except OSError as e:
      if fd is not None:  # e.g. a network filesystem without flock
        logging.warning("running without a lock on %s (%s)", workdir, e)
    else:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
  try:
    if jax.process_count() > 1:  # a barrier: every process sees the workdir as process 0 left it
      refused = multihost_utils.broadcast_one_to_all(np.int32(bool(in_use)))
      in_use = in_use or ("found by process 0" if refused else "")
    if in_use:
      raise ValueError(
          f"--workdir {workdir} is in use by another train.py run ({in_use}); wait for it to "
          "end (or stop it), or give another --workdir"
      )
    yield
    cache_created = False  # a run that ended without its config.json (not JSON) keeps its cache
  finally:
    if fd is not None:
      recorded = _file_version(config_file) != config_before  # the run wrote its config.json
      if not in_use and not recorded:
        if cache_created and os.path.isdir(cache):
          shutil.rmtree(cache, ignore_errors=True)
          # JAX's cache object holds the folder: a later compile of this process (a retry in a
          # notebook) wrote into the removed folder, a warning each; reset, it makes it again.
          compilation_cache.reset_cache()
        if lock_created:
          with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
      os.close(fd)
    if created:
      _remove_made(os.path.abspath(workdir), created)


def _remove_made(folder: str, outermost: str) -> None:
  """Removes `folder` and the folders above it up to `outermost` (_outermost_missing's, which
  this start made) while they are empty; one that is missing (os.makedirs stopped above it: a
  name too long) is passed over, and one that is not empty (or that cannot be removed: another
  process wrote into it meanwhile) stops it."""
  while True:
    if os.path.isdir(folder):
      try:
        os.rmdir(folder)  # only an empty one
      except OSError:
        return
    elif os.path.lexists(folder):  # a file or a link made meanwhile: not this start's
      return
    if folder == outermost or os.path.dirname(folder) == folder:
      return
    folder = os.path.dirname(folder)


def _outermost_missing(path: str) -> str | None:
  """The outermost of `path` and the folders above it that do not exist (os.makedirs makes them
  all), as an absolute path; None where `path` exists."""
  path, missing = os.path.abspath(path), None
  while not os.path.exists(path) and path != os.path.dirname(path):
    path, missing = os.path.dirname(path), path
  return missing


def _file_version(path: str) -> tuple[int, int] | None:
  """(inode, mtime in ns) of a file, None where there is none (or its folder is a file): a file
  written again (to a temporary file, then renamed, as reporting.write_config does) has another."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_ino, st.st_mtime_ns


def _start(config, workdir: str, task: tasks.Task) -> _Start:
  """The model, and a workdir run it can resume or init_from weights that fit it: a misfit
  (another model in the workdir, a converter output as workdir, init_from weights of another
  shape) stops here, before the data is opened or the train step is compiled."""
  model, model_name, overrides = task.create_model()
  shapes = variable_shapes(model)
  frozen = training.check_frozen(shapes["params"], training.frozen_pattern(config))
  if frozen is not None:
    logging.info("%s", frozen)
  ema = config.ema_decay > 0

  def resumable() -> int | None:
    try:
      return checkpoint.resumable_step(workdir, model_name, overrides, ema)
    except checkpoint.OtherModel as e:  # another data.num_classes, model.name, ...
      # the config fields that made the other model, where config.json records the run's
      _check_same_run(config, workdir, task.EVALUATION_ONLY, e.fits)
      raise

  resume = _check_workdir_everywhere(workdir, resumable)
  if resume is None and config.init_from_required and not config.init_from:
    raise ValueError(
        "config.init_from is not set, and this config fine-tunes (config.init_from_required): "
        "give --config.init_from=DIR (a convert_torch_weights.py output or a train.py workdir), "
        "or --config.init_from_required=False to train from random weights"
    )
  labels = task.data_label_names()
  if resume is None:
    reporting.config_file(workdir)  # where _record_config writes: a directory there stops here
    if labels is not None:  # and where it records the names of the labels
      reporting.classes_file(workdir)
    saved = None
  else:
    saved = _check_same_run(config, workdir, task.EVALUATION_ONLY)
    _check_same_labels(config, workdir, labels, saved)
  pretrained, source = None, ""
  if resume is not None and config.init_from:
    logging.info("resuming: config.init_from is used only for a fresh workdir")
  elif config.init_from:
    checkpoint.check_directory(config.init_from, "config.init_from")
    step = None if config.init_from_step == -1 else config.init_from_step
    at_step = "" if step is None else f" step {step}"
    source = f"{config.init_from}{at_step}{' (EMA)' if config.init_from_ema else ''}"
    found, pretrained = _timed(
        f"loading init_from {source}",
        lambda: checkpoint.load_pretrained(config.init_from, step, ema=config.init_from_ema),
    )
    try:
      adopted, _ = task.adopt_pretrained(shapes, pretrained, source)  # a misfit stops here
    except checkpoint.ParamsMismatch as e:
      if name_of(found) == model_name:
        raise
      raise checkpoint.CheckpointError(  # one line: the list would only show the two models
          f"config.init_from {config.init_from} holds {name_of(found)}, which does not "
          f"fit the config's {model_name} ({len(e.problems)} params differ): "
          f"{_init_from_fix(name_of(found), model_name)}"
      ) from e
    _warn_other_classes(config.init_from, labels, source)
    _warn_frozen_at_init(config, shapes["params"], adopted["params"], source)
  elif resume is None:
    if (warning := task.fresh_start_warning()) is not None:
      logging.warning("%s", warning)
    _warn_frozen_at_init(config, shapes["params"], shapes["params"], "")
  return _Start(model, model_name, overrides, resume, pretrained, source, saved, labels)


# What a run writes in its workdir (besides hidden files such as LOCK_FILE): its records (each
# JSON record written to NAME.tmp, then renamed: a kill or a full disk may leave that), the
# compilation cache, and numbered steps (an interrupted save leaves a step's Orbax tmp folder).
_RECORDS = (reporting.CONFIG_FILE, reporting.CLASSES_FILE, reporting.METRICS_FILE)
_RUN_FILES = frozenset(
    {
        *_RECORDS,
        *(f"{name}.tmp" for name in _RECORDS),
        reporting.PLOT_FILE,
        reporting.TENSORBOARD_DIR,
        reporting.COMPILATION_CACHE,
    }
)
_STEP_FOLDER = re.compile(r"\d+(\.orbax-checkpoint-tmp.*)?")


def _check_fresh_workdir(workdir: str) -> None:
  """ValueError where a fresh start's workdir holds anything but hidden files, what a run writes
  (_RUN_FILES, step folders) and other runs' workdirs: a folder of one's own (data, notes, the
  repository) given as --workdir would get the run's checkpoints and records among its files (a
  config.json of its own replaced: one that is no run's config counts as one's own)."""
  if not os.path.isdir(workdir):
    return
  foreign = []
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name)
    if (
        name == reporting.CONFIG_FILE
        and os.path.isfile(path)
        and not reporting.holds_run_config(workdir)
    ):
      foreign.append(name)
    elif name.startswith(".") or name in _RUN_FILES:
      continue
    elif not os.path.isdir(path):
      foreign.append(name)
    elif not (
        _STEP_FOLDER.fullmatch(name)
        or reporting.holds_run_config(path)  # a run's workdir of its own (runs/pets/ablation)
        or os.path.exists(os.path.join(path, LOCK_FILE))
    ):
      foreign.append(f"{name}/")
  if not foreign:
    return
  raise ValueError(
      f"--workdir {workdir} holds files that no train.py run writes "
      f"({reporting.listed(foreign, 3)}), and no run to resume: a new run would write its "
      "checkpoints and records among them; give a new or empty folder as --workdir"
  )


def _check_workdir_everywhere(workdir: str, resumable: Callable[[], int | None]) -> int | None:
  """The step to resume (`resumable()`: resumable_step's), or None after _check_fresh_workdir,
  agreed on by every process: each reads the workdir itself, and one that sees another folder
  there (a disk of its host's own, not one that every process shares) resumed another step, or
  stopped at what it found there (files of one's own, a run of another model, a step it cannot
  read) while the others went on and waited for it in a collective for ever. The processes
  gather the step each resumes and whether its reading failed, and all stop together: a failed
  one with its own error, the others with the steps where they differ, else naming it."""
  # failed: 1 where the workdir holds files of one's own, 2 where reading it failed otherwise;
  # an error is raised after the gather, which the other processes enter
  resume, error, failed = None, None, 0
  try:
    resume = resumable()
  except Exception as e:
    error, failed = e, 2
  if error is None and resume is None:
    try:
      _check_fresh_workdir(workdir)
    except Exception as e:
      error, failed = e, 1 if isinstance(e, ValueError) else 2
  if jax.process_count() > 1:
    own = np.array([-1 if resume is None else resume, failed], np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(own)).reshape(-1, 2)  # [P, 2]
    steps, failed = gathered[:, 0], gathered[:, 1]
    other = np.flatnonzero(steps != steps[0])
    if error is None and other.size:
      found = lambda step: "no run" if step < 0 else f"a run to resume at step {step}"
      raise ValueError(
          f"process {other[0]} finds {found(steps[other[0]])} in --workdir {workdir}, process 0 "
          f"{found(steps[0])}: every process reads and writes the workdir, so give a folder "
          "that they all share (not one on a disk of each host's own)"
      )
    if error is None and failed.any():
      process = np.flatnonzero(failed)[0]
      if failed[process] == 1:
        error = ValueError(
            f"on process {process}, --workdir {workdir} holds files that no train.py run writes "
            "(its error line names them), and no run to resume: give a new or empty folder as "
            "--workdir, one that every process shares"
        )
      else:
        error = ValueError(
            f"on process {process}, reading --workdir {workdir} failed (its error line says "
            "why): every process reads the workdir at its start, so give a folder that they all "
            "share"
        )
  if error is not None:
    raise error
  return resume


def _warn_other_classes(init_from: str, labels, source: str) -> None:
  """Warns where init_from is a run whose data named as many classes as the data's now (`labels`,
  Task.data_label_names), but others (its classes.json): nothing is re-initialized for a class
  count that fits, so the weights it learnt for its classes (a classifier's head) score the
  data's labels by index, other classes than theirs (a fine-tune from cat, dog, fox on dog, fox,
  zebra starts predicting 'cat' for a dog). A classes.json that cannot be read is a warning too
  (reporting.read_classes' error)."""
  if labels is None:  # data whose names the config fixes: nothing to compare
    return
  try:
    recorded = reporting.read_classes(init_from)
  except ValueError as e:  # unreadable, not JSON: the weights are still what init_from asks for
    logging.warning("init_from: %s; its classes are not compared with the data's", e)
    return
  if recorded is None or len(recorded[0]) != len(labels.names):
    return
  change = data.label_names_change(data.LabelNames(*recorded), labels)
  if change is not None:
    logging.warning(
        "init_from: %s holds a run of other classes, as many as the data's, so the weights it "
        "learnt for them (a classifier's head) are kept and score the data's labels by index: "
        "%s (%s)",
        source,
        change,
        os.path.join(init_from, reporting.CLASSES_FILE),
    )


def _warn_frozen_at_init(config, params, adopted, source: str) -> None:
  """Warns where config.frozen keeps params at their initialization: those the task's
  adopt_pretrained left as they were in `params` (ShapeDtypeStructs; `adopted` holds the very
  objects: a head re-initialized for another class count, a segmenter's neck from a classifier),
  every frozen param without init_from (`source` '', `adopted` is `params`)."""
  pattern = training.frozen_pattern(config)
  if not pattern:
    return
  before = traverse_util.flatten_dict(params, sep="/")
  after = traverse_util.flatten_dict(adopted, sep="/")
  frozen = training.frozen_mask(after, pattern)  # a flat dict's keys are the '/'-joined paths
  kept = sorted(k for k, v in after.items() if frozen[k] and before.get(k) is v)
  if not kept:
    return
  if not source:
    logging.warning(
        "config.frozen %r keeps the %s it freezes at their initialization: there is no "
        "config.init_from",
        pattern,
        reporting.counted(len(kept), "array"),
    )
    return
  logging.warning(
      "config.frozen %r keeps %s at their initialization, which %s does not give: %s%s",
      pattern,
      reporting.counted(len(kept), "array"),
      source,
      ", ".join(kept[: checkpoint.MAX_LISTED]),
      ", ..." if len(kept) > checkpoint.MAX_LISTED else "",
  )


def _init_from_fix(found: str, model: str) -> str:
  """What init_from takes for `model`, for an init_from checkpoint of `found` that does not fit."""
  if model in SEGMENTERS:
    classifier, backbone, _ = init_from_models(model)
    return (
        f"{model} starts from {classifier} (an ImageNet classifier), {backbone} (a dense "
        f"backbone) or {model}; or set --config.model.name"
    )
  if found not in classifiers():
    return f"a classifier starts from a classifier: give a {model} checkpoint"
  return f"give a {model} checkpoint, or --config.model.name={found} to fine-tune {found}"


# init_from and its options, each with its value where not set: a resume does not read them, and
# config.json keeps those the run started with.
_INIT_FROM = {
    "init_from": "",
    "init_from_ema": False,
    "init_from_step": -1,
    "init_from_required": False,
}
# The fields a resumed run may change: where the data lies, how the loader runs (the batches do
# not depend on it: fec_jax.data.loader), what init_from names (a resume does not read it),
# how often to log, evaluate and save, how to evaluate (with the task's EVALUATION_ONLY fields),
# and where to stop. A change to any other field would continue the checkpoints as another run
# than theirs.
_FREE_ON_RESUME = frozenset(
    {
        *_INIT_FROM,
        "max_steps",
        "log_every_steps",
        "eval_every_epochs",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "eval_batch_size",
        "data.val_split",
        "data.demo_num_val",
        "data.root",
        "data.tfds_data_dir",
        "data.num_workers",
        "data.prefetch_buffer_size",
        "data.read_threads",
    }
)
_LISTED_CHANGES = 8  # at most this many changed fields are named, with the overrides that undo them


def _check_same_run(
    config, workdir: str, evaluation_only: frozenset[str], fits: bool = True
) -> dict | None:
  """CheckpointError unless `config` is the one the workdir's run started with (its
  config.json; reporting.config_changes), up to the fields of _FREE_ON_RESUME and the task's
  `evaluation_only` ones; `fits`: whether the run's weights can start the config's model (the
  error then offers init_from). Returns the config.json (None: the workdir has none)."""
  saved = reporting.read_config(workdir)
  if saved is None:
    return None
  # data.tfds_data_dir is compared as given: a resume may change it anyway (_FREE_ON_RESUME)
  changes = reporting.config_changes(saved, config) or {}
  changed = sorted(changes.keys() - _FREE_ON_RESUME - evaluation_only)
  if not changed:
    return saved
  listed = ", ".join(
      f"{key} {changes[key][0]!r} (now {changes[key][1]!r})" for key in changed[:_LISTED_CHANGES]
  )
  if len(changed) > _LISTED_CHANGES:  # another config file, rather than a few overrides
    advice = (
        f" and {len(changed) - _LISTED_CHANGES} more. Resume it with the config it started with "
        f"(train.py without --config reads it from {os.path.join(workdir, reporting.CONFIG_FILE)})"
    )
  else:
    overrides = " ".join(_undo(key, *changes[key]) for key in changed)
    advice = f". Resume it with its values ({overrides})"
  init_from = f" (--config.init_from={workdir} to start from its weights)" if fits else ""
  raise checkpoint.CheckpointError(
      f"--workdir {workdir} holds a run started with another config: {listed}{advice}, or start "
      f"a new --workdir{init_from}"
  )


def _check_same_labels(config, workdir: str, labels, saved: dict | None) -> None:
  """CheckpointError where the names the data gives its labels now (`labels`,
  Task.data_label_names) are not those the run started with (tasks.label_names_change): a class
  folder renamed in place, or another data.root with other class folders (data.root may change on
  a resume, the classes may not)."""
  run_data = (saved or {}).get("data") or {}
  change = tasks.label_names_change(labels, workdir, run_data)
  if change is None:
    return
  now = config.get("data") or {}
  if run_data.get("root") and os.path.abspath(now.get("root") or "") != run_data["root"]:
    advice = f"its data ({shlex.quote(_override('data.root', run_data['root']))})"
  else:
    advice = "the names its classes had when it started"
  raise checkpoint.CheckpointError(
      f"--workdir {workdir} holds a run whose labels index other classes: {change}. Resume it "
      f"with {advice}, or start a new --workdir (--config.init_from={workdir} to start from its "
      "weights)"
  )


def _record_config(config, workdir: str, start: _Start) -> None:
  """Writes config.json: a fresh start's config, or on a resume the config with the fields it
  changed (those of _FREE_ON_RESUME and the task's EVALUATION_ONLY: where the run stops, where
  the data lies, how it evaluates, ...), so that `train.py --workdir=DIR` alone goes on as the
  last command did; init_from and its step, EMA and required options stay as the run started (a
  resume does not read them); data.tfds_data_dir '' (or '~/...') as the folder TFDS read.
  write_config makes its paths absolute. A fresh start records classes.json too: the names its
  data gives its labels (Task.data_label_names), which a resume then keeps."""
  saved = start.saved_config
  if start.resume is not None and saved is None:
    logging.info("the workdir had no %s: it records this run's config", reporting.CONFIG_FILE)
  replace = data.recorded_fields(config.get("data"))
  if saved is not None:  # one older than init_from_step (or _required) lacks it: the run took none
    replace.update({key: saved.get(key, unset) for key, unset in _INIT_FROM.items()})
  reporting.write_config(workdir, config, replace)
  if start.resume is None:  # a resume keeps the names the run started with
    reporting.write_classes(workdir, start.labels)


def _undo(key: str, saved, now) -> str:
  """What sets config field `key` back to its `saved` value, for _check_same_run's advice."""
  if saved is reporting.ABSENT:  # a field of the user's own that the run started without
    return f"without config.{key}"
  if now is reporting.ABSENT:  # one it started with: the command line cannot add a field
    return f"config.{key} = {saved!r} in the config file (with config.unlocked())"
  return shlex.quote(_override(key, saved))


def _override(key: str, value) -> str:
  """The command-line override that sets config field `key` to a config.json value."""
  return f"--config.{key}={repr(value) if isinstance(value, tuple) else value}"


def _timed(message: str, fn):
  """Logs `message...` before and `message: N s` after a slow call."""
  logging.info("%s ...", message)
  start = time.perf_counter()
  result = fn()
  logging.info("%s: %.1f s", message, time.perf_counter() - start)
  return result


def _run(
    config,
    workdir,
    task: tasks.Task,
    start: _Start,
    train_iter,
    steps_per_epoch: int,
    preemption: Preemption,
    compiler_options,
) -> RunResult:
  primary = jax.process_index() == 0
  num_steps = training.total_steps(config, steps_per_epoch)
  mesh = training.create_mesh()
  model, model_name, resume = start.model, start.model_name, start.resume
  schedule = training.lr_schedule(config, steps_per_epoch)
  tx = training.create_optimizer(config, schedule)
  abstract = training.abstract_state(model, tx, config, task.input_shape(), mesh)
  state_sharding = jax.tree.map(lambda a: a.sharding, abstract)
  evaluator = _timed(
      "preparing the evaluator", lambda: task.evaluator(model, mesh, compiler_options)
  )
  mngr = checkpoint.training_manager(workdir, config.keep_checkpoints)
  pool, init = None, None  # the thread and the Future of a fresh state
  if resume is None:
    # The state's initialization (a compile of its own, then the run) goes on in a thread while
    # _loop compiles the train step for the abstract state: the two compiles overlap.
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="init")
    state = init = pool.submit(_fresh_state, config, task, start, tx, abstract)
    pool.shutdown(wait=False)  # the thread ends when the state is made (_end_init joins it)
  writer = None
  error = None
  try:
    if resume is not None:
      state = _timed(
          f"restoring checkpoint step {resume} from {workdir}",
          lambda: checkpoint.restore_training(mngr, abstract, train_iter, resume),
      )
      logging.info("resumed at step %d from %s", resume, workdir)
    if primary:  # after the restore: a resume that fails there records nothing
      _record_config(config, workdir, start)
    first_step = resume or 0
    devices, processes = jax.device_count(), jax.process_count()
    logging.info(
        "%s on %s (%s): %s of %d per epoch, global batch %d, peak lr %.3g",
        model_name,
        reporting.counted(devices, "device"),
        reporting.counted(processes, "process"),
        reporting.counted(num_steps, "step"),
        steps_per_epoch,
        config.global_batch_size,
        training.peak_lr(config),
    )
    for warning in (
        training.lr_warning(config),
        training.max_steps_warning(config, steps_per_epoch),
    ):
      if warning is not None:
        logging.warning("%s", warning)
    unevaluated = _unevaluated_last_step(workdir, first_step, num_steps)
    writer = reporting.MetricsWriter(workdir, first_step, active=primary)
    train_step = training.make_train_step(
        task.loss_fn(model, mesh), tx, schedule, config, mesh, state_sharding
    )
    save = lambda s: checkpoint.save_training(mngr, s, model_name, start.overrides, train_iter)
    run = _Run(
        config,
        workdir,
        train_iter,
        evaluator,
        writer,
        save,
        mngr,
        preemption,
        mesh,
        steps_per_epoch,
        num_steps,
        unevaluated,
    )
    result = _loop(run, first_step, state, abstract, train_step, compiler_options)
    mngr.wait_until_finished()
  except BaseException as e:
    error = e
    preemption.failed()  # a signal in the cleanup below says so, not that a step is saved
    raise
  finally:
    _end_init(pool, init, error)
    mngr.close()
    if writer is not None:
      writer.close()
  if primary and not result.preempted:
    logging.info("wrote %s", reporting.plot_metrics(workdir))
  return result


def _end_init(
    pool: concurrent.futures.ThreadPoolExecutor | None,
    init: concurrent.futures.Future | None,
    error: BaseException | None,
) -> None:
  """Joins the thread (`pool`) that initializes a fresh state (`init`; both None on a resume): a
  run that failed before it took the state (in the train step's compile, at the first batch)
  left it running, into the next run of this process, and the process's exit waited for it. The
  thread itself is joined, not only `init` waited for: it outlives the Future's result by a little
  (done callbacks, its own exit). Its own failure, which that run never took, is logged."""
  if pool is None or init is None:
    return
  if not init.done():
    logging.info("waiting for the train state's initialization to end")
  pool.shutdown(wait=True)
  failure = init.exception()
  if failure is not None and failure is not error:  # error: init.result() raised it in the run
    logging.warning(
        "the train state's initialization failed%s: %s: %s",
        " too" if error is not None else "",
        type(failure).__name__,
        failure,
    )


def _fresh_state(config, task: tasks.Task, start: _Start, tx, abstract) -> training.TrainState:
  """State from config.seed, then config.init_from's variables put in (the task's rules)."""
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  state = _timed(
      "initializing the train state",
      lambda: training.create_state(start.model, tx, config, task.input_shape(), shardings),
  )
  pretrained, source = start.pretrained, start.source
  if pretrained is None:
    return state
  variables, notes = task.adopt_pretrained(jax.device_get(state.variables()), pretrained, source)
  for note in notes or [f"every weight comes from {source}"]:
    logging.info("init_from: %s", note)
  variables = jax.device_put(variables, shardings.variables())
  params = variables.pop("params")
  return state.replace(
      params=params,
      model_state=variables,
      ema_params=params if state.ema_params is not None else None,
  )


def _loop(run: _Run, start: int, state, abstract, train_step, compiler_options) -> RunResult:
  """Steps start+1 .. run.num_steps; `step` is the number of optimizer steps done after each.
  state: the TrainState at `start`, or a Future of it (a fresh state being initialized)."""
  record: dict[str, Any] = {}
  if run.unevaluated is not None:
    return _evaluate_last_step(run, state, start)
  if start >= run.num_steps:
    logging.info(
        "nothing to train: %s is at step %d, and this run ends at step %d (max_steps or the "
        "schedule)",
        run.workdir,
        start,
        run.num_steps,
    )
    return RunResult(start, False, record)
  # the loader's workers start and decode the first batch here: seconds on class folders of JPEGs
  first = _timed("reading the first train batch", lambda: next(run.train_iter))
  batch = training.global_batch(first, run.mesh)
  train_step = _timed(
      "compiling the train step (first call)",
      lambda: train_step.lower(abstract, batch).compile(compiler_options),
  )
  if isinstance(state, concurrent.futures.Future):
    state = state.result()
  clock, pending = None, []  # pending: per-step metrics not yet fetched from the device
  evaluated = False
  for step in range(start + 1, run.num_steps + 1):
    if step > start + 1:
      batch = _next_batch(run, state, pending, step - 1)
    state, metrics = train_step(state, batch)
    if pending:  # the previous step is done before this loop goes on: a signal stops the run
      jax.block_until_ready(pending[-1])  # after this step, not after steps dispatched ahead
    pending.append(metrics)
    if clock is None:  # the rate leaves out the first step (and any compile before it)
      jax.block_until_ready(metrics)
      clock = reporting.Throughput(step, run.num_steps, run.config.global_batch_size)
    epoch = _epoch(run, step)
    eval_now = step == run.num_steps or training.eval_due(run.config, step, run.steps_per_epoch)
    save_now = step == run.num_steps or step % run.config.checkpoint_every_steps == 0
    stop = run.preemption.stop_now(step, agree=step == run.num_steps)
    if not (eval_now or save_now or stop or step % run.config.log_every_steps == 0):
      continue
    record, pending = _record(run, pending, step, epoch), []
    img_per_s, eta = clock.update(step)
    logging.info(
        reporting.progress_line(
            step, run.num_steps, epoch, record["train_loss"], record["lr"], img_per_s, eta
        )
    )
    if eval_now and stop:
      logging.info("the evaluation of step %d is skipped: the run is stopping", step)
    elif eval_now:
      try:
        record.update(_evaluate(run.evaluator, state, step, not evaluated, run.preemption))
        evaluated = True
      except Exception as e:  # pylint: disable=broad-except
        if not _skip_failed_evaluation(run.preemption, step, e, "skipped: the run is stopping"):
          _save_unevaluated(run, state, record, e)
          raise
        stop = True
      clock.restart()  # the next rate counts training only, not this evaluation
      if step < run.num_steps:  # a signal during the evaluation: stop here (every process)
        stop = stop or run.preemption.stop_now(step, agree=True)
    # The record goes out before the checkpoint: a run killed in between resumes from an
    # earlier step and the writer drops the records after it, so none is lost or doubled.
    run.writer.write(record)
    if save_now or stop:
      run.save(state)
    if stop:
      _timed(f"writing checkpoint step {step}", run.mngr.wait_until_finished)
      logging.info(
          "%s: stopped at step %d; checkpoint saved in %s; run the same command to resume",
          run.preemption.reason,
          step,
          run.workdir,
      )
      return RunResult(step, True, record)
  return RunResult(run.num_steps, False, record)


def _next_batch(run: _Run, state, pending: list, step: int):
  """The global batch of the step after `step`. Where reading it fails (a file system gone, a
  loader worker killed, an annotation that does not fit the config), `step` is saved first,
  with its record, unless it was just saved. With one process only: a save is collective, and
  the error may be this process's alone, or reach the processes at different steps (each
  prefetches its own batches)."""
  try:
    return training.global_batch(next(run.train_iter), run.mesh)
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() == 1 and run.mngr.latest_step() != step:
      # pending is empty where the record of `step` is written already
      record = _record(run, pending, step, _epoch(run, step)) if pending else None
      _save_before_error(
          run, state, step, record, f"reading the batch of step {step + 1} failed ({e})"
      )
    raise


def _epoch(run: _Run, step: int) -> int:
  """The epoch (from 0) that step `step` (from 1) trains in."""
  return (step - 1) // run.steps_per_epoch


def _evaluate_last_step(run: _Run, state, step: int) -> RunResult:
  """The evaluation of the run's last step, which a signal skipped (run.unevaluated); its record
  is completed only once the evaluation is done."""
  logging.info("step %d, the run's last, was saved without its evaluation: evaluating it", step)
  try:
    metrics = _evaluate(run.evaluator, state, step, True, run.preemption)
  except Exception as e:  # pylint: disable=broad-except
    if not _skip_failed_evaluation(run.preemption, step, e, "run the same command to evaluate it"):
      raise
    return RunResult(step, True, dict(run.unevaluated))
  record = {**run.unevaluated, **metrics}
  run.writer.replace_last(record)  # only now: a failed evaluation leaves the record as it was
  return RunResult(step, False, record)


def _record(run: _Run, pending: list, step: int, epoch: int) -> dict[str, Any]:
  """The metrics record of `step` from the per-step metrics of the steps since the last record
  (fetched from the device now); TrainingDiverged where a loss or gradient norm is not finite."""
  pending = jax.device_get(pending)
  losses = [float(m["loss"]) for m in pending]
  # A finite loss with a non-finite gradient would still poison the params: check both.
  bad = [i for i, m in enumerate(pending) if not np.isfinite([m["loss"], m["grad_norm"]]).all()]
  if bad:
    run.mngr.wait_until_finished()
    raise TrainingDiverged(
        f"non-finite training loss ({losses[bad[0]]}, gradient norm "
        f"{float(pending[bad[0]]['grad_norm'])}) at step {step - len(pending) + bad[0] + 1}; "
        f"stopped, {_last_good(run.mngr.latest_step(), run.workdir)}"
    )
  return {
      "step": step,
      "epoch": epoch,
      "train_loss": float(np.mean(losses)),
      "lr": float(pending[-1]["lr"]),
      "grad_norm": float(pending[-1]["grad_norm"]),
  }


def _unevaluated_last_step(workdir: str, step: int, num_steps: int) -> dict[str, Any] | None:
  """The metrics record of `step` when it is the run's last and has no evaluation: a signal
  stopped the run there, or the run was resumed with its max_steps cut to a checkpoint's step.
  Resuming runs the evaluation. None otherwise. Records after `step` (of steps trained past the
  checkpoint) do not count: the writer drops them. Process 0 decides for all (the evaluation is
  collective)."""
  records = reporting.read_metrics(workdir) if step == num_steps else []
  records = [r for r in records if r["step"] <= step]
  last = records[-1] if records and records[-1]["step"] == step else None
  if last is not None and any(key.startswith("val_") for key in last):
    last = None
  if jax.process_count() > 1:
    found = multihost_utils.broadcast_one_to_all(np.int32(last is not None))
    if not found:
      return None
    last = last or {}  # the record is process 0's to write again
  return last


def _save_unevaluated(run: _Run, state, record: dict[str, Any], error: Exception) -> None:
  """Before an evaluation's error ends the run: the step's record (without val metrics) and its
  checkpoint (e.g. a val split whose every image is bad: found only when it is first read). With
  several processes only for DataNotFoundError, which every process raises (the image count is
  global); another error may be one process's alone, and a save is collective."""
  if jax.process_count() > 1 and not isinstance(error, data.DataNotFoundError):
    return
  step = record["step"]
  what = f"the evaluation of step {step} failed ({error}); its record has no val metrics"
  _save_before_error(run, state, step, record, what)


def _save_before_error(
    run: _Run, state, step: int, record: dict[str, Any] | None, what: str
) -> None:
  """Before an error (`what` happened) ends the run: `step`'s record (None: written already)
  and checkpoint, so that the steps since the last checkpoint are not lost. A save that fails
  too is logged, and the caller's error stands."""
  try:
    if record is not None:
      run.writer.write(record)
    run.save(state)
    _timed(f"writing checkpoint step {step}", run.mngr.wait_until_finished)
  except Exception as e:  # pylint: disable=broad-except
    logging.error("%s; saving step %d failed too: %s", what, step, e)
    return
  logging.warning(
      "%s; step %d is saved in %s: run the same command to resume there", what, step, run.workdir
  )


def _skip_failed_evaluation(preemption, step: int, error: Exception, then: str) -> bool:
  """Whether an evaluation of `step` that raised `error` is skipped, and the step saved: after a
  signal, which stops the run after this step anyway; if so, a line says why and `then` what the
  run does. The signal stops an evaluation part-way (EvaluationStopped, _evaluation_stop: with
  several processes, every one at the same batch). It reaches the loader's worker processes
  too (the whole process group); they start ignoring it (fec_jax.data.loader's launcher), but
  where no launcher could run, a worker still starting up dies of it, which fails the
  evaluation; every evaluation starts its workers afresh. With several processes such an error
  stands: it may be this process's alone, and a save is collective."""
  if preemption.reason is None:
    return False
  if isinstance(error, tasks.EvaluationStopped):
    logging.info("%s: the evaluation of step %d %s; %s", preemption.reason, step, error, then)
    return True
  if jax.process_count() > 1:
    return False
  message = "%s: the evaluation of step %d failed (%s); %s"
  logging.warning(message, preemption.reason, step, error, then)
  return True


def _last_good(step: int | None, workdir: str) -> str:
  if step is None:
    return f"no checkpoint was saved yet in {workdir}"
  return f"the last good checkpoint is step {step} in {workdir}"


def _evaluation_stop(preemption) -> Callable[[], bool]:
  """What stops an evaluation part-way once a signal came (Evaluator.evaluate's `stop`, asked
  after each batch), so that a preempted run need not finish one (minutes for ADE20K's images of
  many sizes) before it saves. Several processes evaluate together: they agree after every
  preemption.SYNC_EVERY_STEPS batches, as on steps (Preemption.stop_now), and stop together."""
  batches = itertools.count(1)
  return lambda: preemption.stop_now(next(batches))


def _evaluate(evaluator, state, step: int, first: bool, preemption) -> dict[str, float]:
  """val_* (and ema_val_*) metrics of the task's evaluator, logged on one line;
  tasks.EvaluationStopped where a signal stopped it (_evaluation_stop)."""
  logging.info("evaluating step %d%s ...", step, " (and compiling the eval step)" if first else "")
  start = time.perf_counter()
  variable_sets = {"val_": state.variables()}  # metric prefix -> weights
  if state.ema_params is not None:
    variable_sets["ema_val_"] = state.variables(ema=True)
  results = tasks.checked_metrics(
      evaluator,
      evaluator.evaluate(list(variable_sets.values()), stop=_evaluation_stop(preemption)),
      len(variable_sets),
  )
  record = {
      prefix + k: v for prefix, metrics in zip(variable_sets, results) for k, v in metrics.items()
  }
  logging.info(
      "eval at step %d (%.1f s): %s",
      step,
      time.perf_counter() - start,
      ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in record.items()),
  )
  return record
