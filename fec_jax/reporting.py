"""What a training run shows and leaves in its workdir: the progress line, the config it started
with (config.json), the names its data gave its labels (classes.json), metrics.jsonl,
TensorBoard event files (tensorboardX) and a PNG plot of the curves (matplotlib Agg).

Only process 0 writes (`MetricsWriter(..., active=jax.process_index() == 0)`).
"""

from __future__ import annotations

import copy
import datetime
import difflib
import functools
import json
import os
import time
from typing import Any, Sequence

from absl import logging
from flax import traverse_util

CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.json"  # the names the data gave the labels at the run's start
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
COMPILATION_CACHE = "compilation_cache"  # JAX's persistent cache of the run's steps (cli)


class Throughput:
  """Images per second and ETA between successive `update` calls."""

  def __init__(self, start_step: int, total_steps: int, global_batch_size: int):
    self._step, self._time = start_step, time.perf_counter()
    self._total, self._batch = total_steps, global_batch_size

  def update(self, step: int) -> tuple[float | None, float | None]:
    """-> (img/s since the last call, seconds left at that rate); (None, None) when no step
    was done since."""
    if step == self._step:
      return None, None
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._time, 1e-9)  # steps/s
    self._step, self._time = step, now
    return rate * self._batch, (self._total - step) / max(rate, 1e-9)

  def restart(self) -> None:
    """The next rate counts from now (e.g. after an evaluation, which is not training)."""
    self._time = time.perf_counter()


def progress_line(
    step: int,
    total: int,
    epoch: int,
    loss: float,
    lr: float,
    img_per_s: float | None,
    eta_s: float | None,
) -> str:
  """'step 120/3000 | epoch 3 | loss 1.2345 | lr 1.250e-04 | 812 img/s | ETA 0:10:21'; the
  rate and ETA read '-' before a step has been timed."""
  rate = "-" if img_per_s is None else f"{img_per_s:.0f}"
  eta = "-" if eta_s is None else datetime.timedelta(seconds=round(eta_s))
  return (
      f"step {step}/{total} | epoch {epoch} | loss {loss:.4f} | lr {lr:.3e} | "
      f"{rate} img/s | ETA {eta}"
  )


UNSERIALIZABLE = "unserializable object"  # how ml_collections writes what JSON cannot hold


def config_data(config) -> dict | None:
  """The config as JSON data: tuples become lists, an object of the user's that JSON cannot
  hold becomes its repr marked UNSERIALIZABLE (ConfigDict.to_json_best_effort); None where
  the config cannot be written at all (a dict with keys that are not strings)."""
  try:
    return json.loads(config.to_json_best_effort())
  except (TypeError, ValueError):
    return None


# The config fields that name a file or directory: config.json records them as absolute paths, so
# that commands on a workdir (eval.py, visualize.py, a resume) work from any directory, and they
# are compared as such.
PATH_FIELDS = ("init_from", "data.root", "data.tfds_data_dir")


def _as_recorded(data: dict, replace: dict[str, Any] | None = None) -> dict:
  """A copy of config data (config_data, or a read config.json) as config.json records it: the
  values of `replace` ({'section.field': value}) put in, then its PATH_FIELDS absolute ('' and a
  URL, gs://..., as they are)."""
  data = copy.deepcopy(data)
  for key, value in (replace or {}).items():
    *sections, field = key.split(".")
    functools.reduce(lambda d, s: d.setdefault(s, {}), sections, data)[field] = value
  for key in PATH_FIELDS:
    *sections, field = key.split(".")
    fields = functools.reduce(lambda d, s: d.get(s) or {}, sections, data)
    value = fields.get(field)
    if isinstance(value, str) and value and "://" not in value:
      fields[field] = os.path.abspath(value)
  return data


def write_config(workdir: str, config, replace: dict[str, Any] | None = None) -> None:
  """Writes a run's config to <workdir>/config.json, at its start and at each resume (a resume
  is checked against it, fec_jax.loop; visualize.py takes the run's image size and
  normalization from it; configs/workdir.py reads it back), its paths absolute (PATH_FIELDS),
  the fields of `replace` ({'section.field': value}) with its values."""
  data = config_data(config)
  if data is None:
    logging.warning("%s not written: the config does not go into JSON", CONFIG_FILE)
    return
  data = _as_recorded(data, replace)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
  os.replace(path + ".tmp", path)


class _Absent:
  """The value of a field that one of two configs lacks (config_changes)."""

  def __repr__(self) -> str:
    return "absent"


ABSENT = _Absent()


def config_changes(
    saved: dict, config, replace: dict[str, Any] | None = None
) -> dict[str, tuple] | None:
  """The fields ('data.image_size', ...) in which `config` differs from `saved` (a run's
  config.json), each as (saved value, config's value), lists as the config's tuples, ABSENT
  for a field that only one of the two has (one of the user's own, added or left out), except
  the fields of _ADDED_LATER (a config.json of an earlier fec-jax lacks them; one of
  _EARLIER_VALUES is compared as its value there). Values JSON cannot hold (written with their
  address) are not compared; NaN equals NaN; paths (PATH_FIELDS) are compared, and given, as
  absolute paths; `replace` as in write_config. None where `config` cannot go into JSON at
  all."""
  now = config_data(config)
  if now is None:
    return None
  saved = traverse_util.flatten_dict(_as_recorded(saved), sep=".")
  now = traverse_util.flatten_dict(_as_recorded(now, replace), sep=".")
  saved = {**{k: v for k, v in _EARLIER_VALUES.items() if k in now}, **saved}
  keys = (saved.keys() | now.keys()) - (_ADDED_LATER - saved.keys())
  return {
      key: (_tuples(saved.get(key, ABSENT)), _tuples(now.get(key, ABSENT)))
      for key in sorted(keys)
      if key not in saved or key not in now or not _same_value(saved[key], now[key])
  }


def is_unserializable(value) -> bool:
  """Whether a config_data value stands for an object JSON cannot hold (written with its
  address, so no two runs' compare equal)."""
  return isinstance(value, str) and value.startswith(UNSERIALIZABLE)


def _same_value(saved, now) -> bool:
  if is_unserializable(saved) or is_unserializable(now):
    return True
  return saved == now or json.dumps(saved) == json.dumps(now)


def has_config(directory: str) -> bool:
  """Whether `directory` holds a file config.json, as a train.py workdir of this fec-jax does (a
  file of that name of one's own too: holds_run_config tells a run's apart)."""
  return os.path.isfile(os.path.join(directory, CONFIG_FILE))


def holds_run_config(directory: str) -> bool:
  """Whether `directory` holds the config.json of a run (a JSON object with the model field every
  task reads), not a file of that name of one's own or of another program (a project's settings,
  a Hugging Face model's)."""
  try:
    saved = read_config(directory)
  except (OSError, ValueError):  # unreadable, not JSON, not an object
    return False
  return saved is not None and "model" in saved


def config_file(workdir: str) -> str:
  """The path of a workdir's config.json; ValueError where a directory stands in its place (one
  that train.py could not write)."""
  return _record_file(workdir, CONFIG_FILE, "the config the run started with")


def classes_file(workdir: str) -> str:
  """The path of a workdir's classes.json; ValueError where a directory stands in its place."""
  return _record_file(workdir, CLASSES_FILE, "the names the run's labels had")


def _record_file(workdir: str, name: str, what: str) -> str:
  path = os.path.join(workdir, name)
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory; expected {what}, a file")
  return path


def read_config(workdir: str) -> dict | None:
  """The config.json of a train.py workdir as nested dicts (tuples read back as lists); None
  where there is none (a converter output, a workdir of an earlier fec-jax)."""
  path = config_file(workdir)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      saved = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} is not JSON ({e}); expected the config the run started with")
  if not isinstance(saved, dict):
    raise ValueError(
        f"{path} holds a JSON {type(saved).__name__}; expected an object, the config the run "
        "started with"
    )
  return saved


def write_classes(workdir: str, labels: tuple[tuple[str, ...], str] | None) -> None:
  """Records in <workdir>/classes.json the names a fresh run's data gives its labels and where
  they were read, `labels` (names, origin): label i is names[i]. A resume and eval.py then tell
  when they changed since (fec_jax.tasks.label_names_change), and visualize.py names the classes
  once the data is gone. None (data whose names the config fixes): an earlier record is removed."""
  path = os.path.join(workdir, CLASSES_FILE)
  if labels is None:
    if os.path.isfile(path):
      os.remove(path)
    return
  names, origin = labels
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(json.dumps({"origin": origin, "names": list(names)}, indent=2) + "\n")
  os.replace(path + ".tmp", path)


def read_classes(workdir: str) -> tuple[tuple[str, ...], str] | None:
  """(names, origin) as write_classes recorded them; None where the workdir has no record (a run
  of an earlier fec-jax, of data whose names the config fixes, a converter output). ValueError
  where the file cannot be read or is not such a record (a directory: classes_file)."""
  path = classes_file(workdir)
  if not os.path.isfile(path):
    return None
  expected = 'expected {"origin": "...", "names": [...]}, the names the run\'s labels had'
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except OSError as e:  # permissions, an I/O error
    raise ValueError(f"{path} cannot be read ({e.strerror or e}); {expected}") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not JSON ({e}); {expected}")
  names = saved.get("names") if isinstance(saved, dict) else None
  if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
    raise ValueError(f"{path} holds {json.dumps(saved)[:80]}; {expected}")
  return tuple(names), str(saved.get("origin", ""))


_LISTED = 5  # restore_config names at most this many missing (or unknown) fields
# Config fields added after runs were made: a config.json without one (a run of an earlier
# fec-jax) gets its default, which is how that run behaved. Each names or shows things, or is read
# only by a fresh start (init_from_step, init_from_required), except those of _EARLIER_VALUES,
# which change how a run trains: a resume compares a config.json without one as that value, the
# one every earlier run trained with.
_EARLIER_VALUES = {"frozen": ""}
_ADDED_LATER = frozenset(
    {"data.class_names", "init_from_required", "init_from_step", *_EARLIER_VALUES}
)


def restore_config(saved: dict, template, where: str):
  """The config a run started with: `template`, a config of the run's task (its fields and
  types), with the values of `saved` (the run's config.json, read_config), lists read back as the
  template's tuples. ValueError naming `where` where the two differ in their fields (a
  config.json of another fec-jax version; the fields of _ADDED_LATER may be missing), or where
  a value is one JSON could not hold or one of another type."""
  saved = traverse_util.flatten_dict(saved, sep=".")
  fields = traverse_util.flatten_dict(template.to_dict(), sep=".")
  missing = sorted(fields.keys() - saved.keys() - _ADDED_LATER)
  unknown = sorted(saved.keys() - fields.keys())
  if missing or unknown:
    differences = [
        f"{label} {listed(keys, _LISTED)}"
        for label, keys in (("lacks", missing), ("has the unknown", unknown))
        if keys
    ]
    raise ValueError(
        f"{where} {' and '.join(differences)}: it is not a config of this fec-jax's "
        f"{template.task!r} task"
    )
  config = template.copy_and_resolve_references()
  for key, value in saved.items():
    if isinstance(value, str) and value.startswith(UNSERIALIZABLE):
      raise ValueError(f"{where} holds {key} as {value!r}, a value JSON cannot hold")
    if isinstance(fields[key], tuple):
      value = _tuples(value)
    if not _fits(value, fields[key]):
      raise ValueError(f"{where} holds {key} as {value!r}; expected {kind(fields[key])}")
    config.update_from_flattened_dict({key: value})
  return config


def counted(n: int, noun: str) -> str:
  """`n` and the noun for a message: '1 val image', '3 val images', '2 processes', '2 batches'
  (a noun that ends in 's', 'x', 'z', 'ch' or 'sh' takes 'es')."""
  plural = "es" if noun.endswith(("s", "x", "z", "ch", "sh")) else "s"
  return f"{n} {noun if n == 1 else noun + plural}"


def did_you_mean(given: Sequence[str], names: Sequence[str]) -> str:
  """'; did you mean fec_small?' for a message on names not among `names` (a model name, an
  option): the closest of `names` to each of `given` where one is close (difflib's measure), or
  '' where none is. What is no str is no name and is left out (a model name None, a number)."""
  names = [n for n in names if isinstance(n, str)]
  close = [c for g in given if isinstance(g, str) for c in difflib.get_close_matches(g, names, n=1)]
  return f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else ""


def listed(names: list[str], limit: int) -> str:
  """The first `limit` of `names` for a message: 'a, b, c and 2 more'."""
  more = len(names) - limit
  return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def _fits(value, like) -> bool:
  """Whether a config.json value can stand for the template's `like`: the same kind of value
  (an int for a float, not the reverse), tuples element by element."""
  if isinstance(like, tuple):
    return isinstance(value, tuple) and (not like or all(_fits(v, like[0]) for v in value))
  if isinstance(like, bool) or not isinstance(like, (int, float)):
    return type(value) is type(like)
  kinds = (int, float) if isinstance(like, float) else (int,)
  return isinstance(value, kinds) and not isinstance(value, bool)


def kind(like) -> str:
  """What _fits takes for `like`, in words: 'an int', 'a tuple of float values', ... (and a
  config override of its field: cli)"""
  if isinstance(like, tuple) and like:
    return f"a tuple of {type(like[0]).__name__} values"
  name = type(like).__name__
  return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _tuples(value):
  """A JSON list (lists within included) as the tuple the config held."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def read_metrics(workdir: str) -> list[dict]:
  """The records of metrics.jsonl. A last line without its newline is a record cut off by a
  kill during its write, and is left out (resuming drops it anyway: the checkpoint of its step
  was not written); any other line that is not JSON is an error naming the file and line."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  lines = text.split("\n")[:-1]  # complete lines; the rest, if any, was cut off
  records = []
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {number} is not a JSON record ({e}); expected one per line")
  return records


class MetricsWriter:
  """Appends records to metrics.jsonl and TensorBoard. On a resumed run, records after the
  restored step (written before the interruption) are dropped, so the file reads as if the
  run had never stopped."""

  def __init__(self, workdir: str, resume_step: int, active: bool = True):
    self._workdir, self._active = workdir, active
    if not active:
      return
    self._rewrite([r for r in read_metrics(workdir) if r["step"] <= resume_step])
    from tensorboardX import SummaryWriter  # imported here: only the writing process needs it

    self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=resume_step + 1)

  def write(self, record: dict) -> None:
    """record: {'step': int, 'epoch': int, and float metrics such as 'train_loss', 'lr'}."""
    if not self._active:
      return
    with open(os.path.join(self._workdir, METRICS_FILE), "a") as f:
      f.write(json.dumps(record) + "\n")
    self._add_scalars(record)

  def replace_last(self, record: dict) -> None:
    """Writes `record` in place of the file's last record (of the same step), e.g. with the
    metrics of an evaluation that was skipped; TensorBoard gets its new values."""
    if not self._active:
      return
    records = read_metrics(self._workdir)
    if not records or records[-1]["step"] != record["step"]:
      raise ValueError(f"the last record of {self._workdir} is not of step {record['step']}")
    self._rewrite(records[:-1] + [record])
    self._add_scalars(record, skip=records[-1].keys())  # only the new values

  def _rewrite(self, records: list[dict]) -> None:
    """metrics.jsonl holds `records`, replaced in one step: a kill here loses no record."""
    path = os.path.join(self._workdir, METRICS_FILE)
    with open(path + ".tmp", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(path + ".tmp", path)

  def _add_scalars(self, record: dict, skip=()) -> None:
    """TensorBoard: the values of `record` at its step, but those in `skip`."""
    for key, value in record.items():
      if key != "step" and key not in skip:
        self._tb.add_scalar(key, value, record["step"])
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._tb.close()


def plot_metrics(workdir: str) -> str | None:
  """Writes curves.png (train and val loss, EMA's too, lr, the other val metrics vs step) from
  metrics.jsonl; returns its path, or None when there is nothing to plot."""
  records = read_metrics(workdir)
  if not records:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def series(key):
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  axes[0].plot(*series("train_loss"), label="train")
  for key, label in (("val_loss", "val"), ("ema_val_loss", "EMA val")):
    points = series(key)
    if points[0]:  # a segmenter's evaluation gives no loss: no empty "val" in the legend
      axes[0].plot(*points, "o-", label=label)
  axes[0].set_title("loss")
  axes[1].plot(*series("lr"))
  axes[1].set_title("learning rate")
  metrics = sorted(
      {k for r in records for k in r if "val_" in k and not k.endswith(("loss", "images"))}
  )
  for key in metrics:
    axes[2].plot(*series(key), "o-", label=key)
  axes[2].set_title("held-out metrics")
  for ax in axes:
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.tight_layout()
  path = os.path.join(workdir, PLOT_FILE)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
