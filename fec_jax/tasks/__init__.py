"""Tasks: what the task-neutral loop (fec_jax.loop.train_and_evaluate) and eval.py ask of a
task. A task brings its model, data, per-device augmentation and loss, its evaluator (metrics
and their summary), its config checks and its rules for starting from pretrained weights; the
loop brings the mesh, state, optimizer, EMA, checkpoints, preemption, NaN stop and reporting.

`config.task` names the task; `get(config)` returns it. A task of one's own is a Task subclass
made known with `register(name, TaskClass)`.
"""

from __future__ import annotations

import abc
import datetime
import os
import time
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from fec_jax import data, reporting, training
from fec_jax.model import create_model
from fec_jax.training import LossFn


class EvaluationStopped(Exception):
  """An evaluation given up part-way because its `stop` said so (a signal: the run stops)."""


class MetricsError(TypeError):
  """An evaluator's result that is not what the loop and eval.py take (checked_metrics); the
  commands report it as one error line naming the evaluator."""


class TrainLoaderError(TypeError):
  """A Task.train_loader result that the loop cannot train on and checkpoint (checked_loader);
  train.py reports it as one error line naming the task."""


class Progress:
  """An evaluation's progress: `update(done)` after each batch writes a line to `log` at most
  every `every` seconds (none for an evaluation shorter than that), and raises
  EvaluationStopped once `stop()` is true, except after the last batch (the metrics are done).
  `verb`, `split` and `unit` (a singular noun, counted as reporting.counted counts it) name the
  work: 'evaluated 3 of 8 val images', '0 of 1 val image' (visualize_seg.py: 'predicted', and
  split '' for image files of one's own)."""

  def __init__(
      self,
      total: int,
      unit: str,
      stop: Callable[[], bool] | None,
      log,
      every=30.0,
      verb: str = "evaluated",
      split: str = "val ",
  ):
    self._total, self._unit, self._stop, self._log, self._every = total, unit, stop, log, every
    self._verb, self._split = verb, split
    self._start = self._last = time.perf_counter()

  def update(self, done: int, note: str = "") -> None:
    of = f"{done} of {reporting.counted(self._total, self._split + self._unit)}"
    if done < self._total and self._stop is not None and self._stop():
      raise EvaluationStopped(f"stopped after {of}")
    now = time.perf_counter()
    if now - self._last >= self._every:
      self._last = now
      elapsed = datetime.timedelta(seconds=round(now - self._start))
      self._log(f"{self._verb} {of}{note} in {elapsed}")


class Evaluator(abc.ABC):
  """Runs a model over the task's held-out data. Built once per run (data sources, jitted
  step); each call reads the data afresh, once for all the weight sets it is given, and
  releases its loader before returning."""

  def __call__(self, variables: dict, per_class: bool = False, **kwargs) -> dict[str, float]:
    """variables {'params': ..., **model_state}, replicated -> metrics, e.g. {'top1': 76.1}."""
    results = self.evaluate([variables], per_class, **kwargs)
    return checked_metrics(self, results, 1, per_class)[0]

  @abc.abstractmethod
  def evaluate(
      self,
      variable_sets: Sequence[dict],
      per_class: bool = False,
      stop: Callable[[], bool] | None = None,
      log: Callable[[str], None] = logging.info,
  ) -> list[dict[str, float]]:
    """The metrics of each weight set (e.g. the params and their EMA), in one pass over the
    data: each batch is read and decoded once and run through every set. A list with one dict
    per set of metric name -> number (a Python int or float, a NumPy scalar or a 0-d array:
    checked_metrics), which metrics.jsonl records as val_<name> and ema_val_<name>. Each
    set's metrics hold 'images', the number of images they cover (an unreadable one is left
    out); with none, fec_jax.data.DataNotFoundError (nothing_to_evaluate). With per_class, they
    also hold 'per_class': {column: [K] array}, e.g. {'IoU': ..., 'Acc': ...}
    (Task.per_class_table).

    A long evaluation writes a progress line to `log` every 30 s (Progress). `stop` is asked
    after each batch: once it is true, EvaluationStopped. With several processes, each asks it
    after the same batches: the loop's `stop` all-gathers the processes' signals at every 10th
    batch, and all stop together."""

  def describe(self) -> str:
    """What makes this evaluator's metrics, as checked_metrics' errors name it."""
    return f"{type(self).__name__}.evaluate"

  @staticmethod
  def nothing_to_evaluate(data_config) -> Exception:
    """The error of an evaluation that found no readable image (data_config: fec_jax.data's
    config, or None)."""
    where = "the val data" if data_config is None else data.data_location(data_config)
    return data.DataNotFoundError(
        f"no readable val image in {where}: nothing to evaluate (the loader logged why each "
        "image failed)"
    )


class BatchEvaluator(Evaluator):
  """An evaluation by sums over the batches of a data-parallel split, as the classification's
  (a task of one's own can take it as it is):
    step(variables, batch, per_class) -> a tree of sums over the batch's examples, with 'count'
      (how many it counts; padding and unreadable images have batch['mask'] False), traced and
      jitted with the variables replicated and the global batch split over the mesh;
    summarize(sums, per_class) -> the metrics of one weight set, on the host.
  `dataset` is re-iterable (fec_jax.data.create_dataset, or any iterable of batches): each
  evaluation reads it once, this host's share, and closes its iterator where it has close().
  `data_config` names the data in the error of a split with nothing to count (fec_jax.data's
  config; None: "the val data"). The step is compiled at the first batch (one shape for all)
  with `compiler_options`."""

  def __init__(
      self,
      dataset,
      num_batches: int,
      step: Callable,
      summarize: Callable,
      mesh: Mesh,
      data_config,
      compiler_options: dict | None = None,
  ):
    training.check_mesh(mesh)  # once here, not at every batch's global_batch
    self._dataset, self._num_batches, self._summarize = dataset, num_batches, summarize
    self._mesh, self._data_config, self._compiler_options = mesh, data_config, compiler_options
    self._jitted = jax.jit(
        step,
        in_shardings=(training.replicated(mesh), training.batch_sharded(mesh)),
        out_shardings=training.replicated(mesh),
        static_argnums=2,
    )
    self._steps = {}  # per_class -> the compiled step

  def describe(self) -> str:
    """Its metrics are those of the summarize given to it: the code of one's own it names."""
    name = getattr(self._summarize, "__qualname__", repr(self._summarize))
    return f"{super().describe()} (summarize {name})"

  def evaluate(
      self,
      variable_sets: Sequence[dict],
      per_class: bool = False,
      stop: Callable[[], bool] | None = None,
      log: Callable[[str], None] = logging.info,
  ) -> list[dict[str, float]]:
    totals = [None] * len(variable_sets)
    progress = Progress(self._num_batches, "batch", stop, log)
    batches = iter(self._dataset)
    try:
      for done, local in enumerate(batches, 1):
        batch = training.global_batch(local, self._mesh)
        if per_class not in self._steps:
          lowered = self._jitted.lower(variable_sets[0], batch, per_class)
          self._steps[per_class] = lowered.compile(self._compiler_options)
        for i, variables in enumerate(variable_sets):
          sums = self._steps[per_class](variables, batch)
          totals[i] = sums if totals[i] is None else jax.tree.map(jnp.add, totals[i], sums)
        progress.update(done)
    finally:
      if hasattr(batches, "close"):
        batches.close()  # a grain loader's worker processes end here
    totals = jax.device_get(totals)
    if totals[0] is None or not totals[0]["count"]:
      raise self.nothing_to_evaluate(self._data_config)
    return [self._summarize(sums, per_class) for sums in totals]


def checked_metrics(
    evaluator: Evaluator, results, count: int, per_class: bool = False
) -> list[dict[str, Any]]:
  """An Evaluator.evaluate result as the loop and eval.py take it: `count` dicts of metric name
  -> Python int or float (NumPy scalars and 0-d arrays converted; 'per_class' as it is, a dict,
  which each must hold where `per_class` asked for it). MetricsError naming the evaluator for
  anything else, which would otherwise fail later, in the JSON of metrics.jsonl, in a log line's
  format or in eval.py's per-class table."""
  expected = (
      f"expected a list of {reporting.counted(count, 'dict')}, one per weight set, of metric "
      "name -> number (and 'per_class' with per_class)"
  )
  where = f"{evaluator.describe()} returned"
  if not isinstance(results, (list, tuple)) or len(results) != count:
    raise MetricsError(f"{where} {type(results).__name__} {results!r:.200}; {expected}")
  checked = []
  for metrics in results:
    if not isinstance(metrics, dict):
      raise MetricsError(f"{where} a {type(metrics).__name__} in its list; {expected}")
    if per_class and not isinstance(metrics.get("per_class"), dict):
      raise MetricsError(
          f"{where} {sorted(metrics)} with per_class, without a 'per_class' dict of column -> "
          "[num_classes] array (Task.per_class_table); return one there, or leave out per_class "
          "(eval.py --per_class)"
      )
    numbers = {}
    for name, value in metrics.items():
      if name == "per_class":
        numbers[name] = value
        continue
      kind = getattr(value, "dtype", None)
      real = kind is not None and jnp.issubdtype(kind, jnp.number)  # bfloat16 included
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        numbers[name] = value
      elif real and not jnp.issubdtype(kind, jnp.complexfloating) and np.ndim(value) == 0:
        number = np.asarray(value)
        numbers[name] = float(number) if jnp.issubdtype(kind, jnp.floating) else int(number)
      else:
        shape = f" of shape {np.shape(value)}" if kind is not None else ""
        raise MetricsError(f"{where} {name!r}: {type(value).__name__}{shape}; {expected}")
    checked.append(numbers)
  return checked


def checked_loader(task: "Task", result) -> tuple[Any, int]:
  """Task.train_loader's result as the loop takes it: (an iterator whose position the
  checkpoints save, steps per epoch). TrainLoaderError naming the task otherwise: a plain
  iterator (a generator) trained the whole stretch up to the first checkpoint, which then failed
  in Orbax's thread with "'generator' object has no attribute 'get_state'"."""
  problem = _loader_problem(result)
  if problem is None:
    return result[0], int(result[1])
  opened = result[0] if isinstance(result, tuple) and result else result
  if hasattr(opened, "close"):
    opened.close()  # a loader's worker processes, a generator's finally
  raise TrainLoaderError(
      f"{type(task).__name__}.train_loader returned {problem}; expected (a grain iterator, steps "
      "per epoch): the checkpoints save the iterator's position with its get_state() and a "
      "resume restores it with set_state(), so it must be grain's, e.g. "
      "iter(grain.MapDataset.source(...).batch(...).to_iter_dataset()), "
      "iter(grain.DataLoader(...)) or fec_jax.data.create_loader(...), not a generator or another "
      "plain iterator"
  )


def _loader_problem(result) -> str | None:
  """What is wrong with a train_loader result (checked_loader), or None."""
  if not isinstance(result, tuple) or len(result) != 2:
    return f"a {type(result).__name__}"
  iterator, steps = result
  missing = [m for m in ("get_state", "set_state") if not hasattr(iterator, m)]
  if missing:
    return f"a {type(iterator).__name__} without {', '.join(missing)}"
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    return f"{steps!r} steps per epoch, not a positive int"
  return None


class Task(abc.ABC):
  """One task on the training library. The loop calls check_config, check_training and
  create_model first, then (with init_from) adopt_pretrained on the variables' shapes, so that a
  misfit stops the run before anything slow; then train_loader, input_shape, evaluator,
  adopt_pretrained on the initialized variables and loss_fn. A task of one's own subclasses it
  and is made known with register(); see docs/training.md, The training library."""

  # Task-specific config fields that only change how the task evaluates, not what is trained: a
  # resumed run may change them (fec_jax.loop's _FREE_ON_RESUME has the task-neutral ones).
  EVALUATION_ONLY: frozenset[str] = frozenset()
  # Whether the evaluator splits config.eval_batch_size over the devices, which must then divide
  # it (the segmentation's takes one image at a time and does not read it).
  BATCHED_EVALUATION: bool = True

  def __init__(self, config):
    self.config = config

  @abc.abstractmethod
  def check_config(self) -> None:
    """Raises ValueError for a config this task cannot run, before anything slow."""

  def check_training(self) -> None:
    """Raises ValueError for a config this task can evaluate but not train (the loop calls it
    after check_config; eval.py does not); nothing by default."""

  def check_eval_data(self) -> None:
    """Reads a little of the held-out data at a training run's start (the loop calls it once the
    train data is opened, before anything is compiled), so that data the first evaluation would
    stop on, hours in, stops the run there; nothing by default. Every process calls it at the same
    point: where its outcome may differ between processes, it agrees with the others through a
    collective (multihost_utils), so that all stop together."""

  def create_model(self) -> tuple[nn.Module, str, dict[str, Any]]:
    """-> (model, registered model name, the overrides that rebuild it: create_model(name,
    **overrides); stored in checkpoints so that load_pretrained rebuilds the model).

    By default config.model.name with config.data.num_classes, config.model.drop_path_rate and
    the compute dtype config.model.dtype (not stored: a runtime option)."""
    c = self.config
    overrides = dict(num_classes=c.data.num_classes, drop_path_rate=c.model.drop_path_rate)
    model = create_model(c.model.name, dtype=jnp.dtype(c.model.dtype), **overrides)
    return model, c.model.name, overrides

  @abc.abstractmethod
  def input_shape(self) -> tuple[int, ...]:
    """Shape of the dummy input that initializes the model, e.g. (1, 224, 224, 3)."""

  @abc.abstractmethod
  def train_loader(self, process_index: int, process_count: int) -> tuple[Iterator[dict], int]:
    """-> (a checkpointable grain iterator over this host's train batches, steps per epoch).
    A batch is a dict of arrays with this host's share of config.global_batch_size on the
    first axis, e.g. the classification data's 'image' uint8 [b, H, W, 3] and 'label' int32
    [b] (fec_jax.data.create_dataset); loss_fn receives it as a global batch."""

  @abc.abstractmethod
  def loss_fn(self, model: nn.Module, mesh: Mesh) -> LossFn:
    """(params, model_state, global batch, step key) -> (loss, new model_state), traced inside
    the jitted train step; per-device augmentation goes here (jax.shard_map over `data`)."""

  def check_num_classes(self, model: nn.Module) -> None:
    """ValueError unless `model` (e.g. a checkpoint's) has config.data.num_classes classes."""
    if model.num_classes != self.config.data.num_classes:
      raise ValueError(
          f"the model has {reporting.counted(model.num_classes, 'class')} but "
          f"config.data.num_classes is {self.config.data.num_classes}: give the config of the "
          f"checkpoint's run, or --config.data.num_classes={model.num_classes} for data of its "
          "classes"
      )

  @abc.abstractmethod
  def evaluator(
      self, model: nn.Module, mesh: Mesh, compiler_options: dict | None = None
  ) -> Evaluator:
    """The held-out evaluation of this task (compiler_options: the XLA options that the loop
    compiles the train step with, e.g. xla_allow_excess_precision; for its jitted steps too)."""

  def fresh_start_warning(self) -> str | None:
    """A warning for a fresh run without config.init_from (random weights), where the task's
    recipe starts from pretrained ones; None by default."""
    return None

  @abc.abstractmethod
  def adopt_pretrained(
      self, variables: dict, pretrained: dict, source: str
  ) -> tuple[dict, list[str]]:
    """Fine-tuning start (config.init_from): fresh `variables` ({'params', ...model state})
    with the matching leaves of `pretrained` (the variables of a checkpoint; `source` names it in
    messages) put in. Called twice: first on ShapeDtypeStructs (fec_jax.model.variable_shapes),
    so that a misfit stops the run before anything slow, then on the initialized arrays.
    -> (variables, one line per deliberate change, e.g. a re-initialized head); raises
    fec_jax.checkpoint.CheckpointError listing every other missing, unexpected or mis-shaped
    parameter."""

  @abc.abstractmethod
  def describe(self, metrics: dict[str, float]) -> str:
    """One line for eval.py (a task of one's own: with --config, its config file), e.g.
    'top-1 76.10%  top-5 92.90%  loss 0.9876  (50000 val images)'."""

  @abc.abstractmethod
  def class_names(self) -> tuple[str, ...]:
    """The names of config.data's classes in label order ('class 0', ... where not known)."""

  def data_label_names(self) -> data.LabelNames | None:
    """The names that config.data's data itself gives its labels, where they can change under a
    run while its config stays (a folder dataset's class folders, renamed or moved; a TFDS
    dataset's ClassLabel names): a fresh run records them in its workdir, and a resume or
    eval.py stops where they differ (label_names_change). None where the config fixes them (the
    default); called at the start of a run and of an evaluation, so cheap (a folder listing)."""
    return None

  def per_class_table(self, per_class: dict[str, np.ndarray]) -> str:
    """eval.py's table of an evaluation's per_class metrics: one row per class, its name and
    each column's value (integers as they are, percentages to 2 decimals, 'nan' where a class
    has none, as in mmseg's table)."""
    names = self.class_names()
    for column, values in per_class.items():
      if np.ndim(values) != 1 or len(values) != len(names):
        raise MetricsError(
            f"the per_class column {column!r} is of shape {np.shape(values)}, but "
            f"{type(self).__name__}.class_names() names "
            f"{reporting.counted(len(names), 'class')}; expected one value "
            "per class: return them so, or override class_names() to name the classes the "
            "values are of"
        )
    header = ["class", *per_class]
    rows = [
        [name, *(_cell(values[i]) for values in per_class.values())] for i, name in enumerate(names)
    ]
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]
    line = lambda row: "  ".join(
        cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))
    )
    return "\n".join(line(row).rstrip() for row in [header, *rows])


def label_names_change(
    now: data.LabelNames | None, workdir: str, saved_data: dict | None = None
) -> str | None:
  """Where the names that a task's data gives its labels `now` (Task.data_label_names) differ from
  those recorded when `workdir`'s run started (reporting.CLASSES_FILE): the first label that
  differs and the record, e.g. "label 0 is 'dog' in the class folders in /d/train now, 'Dog' when
  the run started (/w/classes.json)"; labels index the names, so the run's predictions would be
  of other classes. A run of an earlier fec-jax recorded none: with `saved_data` (the data section
  of its config.json), those of its data there where they are still found and are read from
  elsewhere now (a resume from another data.root). None where they are the same or not known."""
  if now is None:
    return None
  recorded = reporting.read_classes(workdir)
  if recorded is not None:
    then = data.LabelNames(*recorded)
    where = f" ({os.path.join(workdir, reporting.CLASSES_FILE)})"
  elif saved_data and data.classes.own_names_origin(saved_data) != now.origin:
    then, where = data.label_names(saved_data), ""
  else:
    return None
  change = None if then is None else data.label_names_change(then, now)
  return None if change is None else change + where


def _cell(value) -> str:
  return str(value) if isinstance(value, (int, np.integer)) else f"{value:.2f}"


_REGISTERED: dict[str, type[Task]] = {}  # the tasks of one's own, register()


def _builtin() -> dict[str, type[Task]]:
  from fec_jax.tasks import classification, segmentation  # imported here: loaded on demand

  return {
      "classification": classification.Classification,
      "segmentation": segmentation.Segmentation,
  }


def register(name: str, task: type[Task]) -> None:
  """Makes config.task `name` choose `task`, a Task subclass of one's own. Call it before
  train_and_evaluate; for train.py and eval.py, in the config file that names the task (or a
  module it imports), so that --config=that_file brings it. Registering a name again replaces
  its class (a config file is loaded more than once)."""
  if not isinstance(name, str) or not name:  # config.task is a str: 3 would break get()'s list
    raise TypeError(f"register({name!r}, ...): expected a name, a non-empty str for config.task")
  if not (isinstance(task, type) and issubclass(task, Task)):
    raise TypeError(f"register({name!r}, {task!r}): expected a subclass of fec_jax.tasks.Task")
  if name in _builtin():
    raise ValueError(f"register({name!r}, ...): {name!r} is a task of fec-jax; choose another name")
  _REGISTERED[name] = task


def get(config) -> Task:
  """The task that config.task names (fec-jax's or a registered one)."""
  known = {**_builtin(), **_REGISTERED}
  if config.task not in known:
    raise ValueError(
        f"config.task {config.task!r} is not a task; choose one of {sorted(known)}"
        f"{reporting.did_you_mean([str(config.task)], sorted(known))} (a task of your own: "
        f"fec_jax.tasks.register({config.task!r}, YourTask) first, e.g. in the config file that "
        "names it)"
    )
  return known[config.task](config)
