"""Orbax checkpoints of FEC models: the converter writes them, train.py writes them, and
`load_pretrained` restores either.

A checkpoint directory is an Orbax CheckpointManager root whose steps hold (at least) the items
  model   JSON {"name": "fec_small", "overrides": {"num_classes": 1000, ...}}
  params  the Flax params PyTree
  batch_stats  the BatchNorm running statistics (segmenters, fec_jax.fpn); any other variable
               collection of a model would be one item of its own too
and, from train.py (`training_manager`, `save_training`, `restore_training`), more items:
  ema_params      the EMA of the params (when the run keeps one; load_pretrained(ema=True))
and, which inference ignores,
  opt_state       the optax state
  progress        {"step": int32 [], "rng": uint32 key data}
  data_iterator   the grain train iterator state, one JSON file per process
Both write
  checksums   JSON {item: [CRC-32 of each array's bytes, in leaf order]}: a restore compares the
              arrays it read with them (nothing else in the files checks an array's bytes: a
              changed byte in the chunks of TensorStore's data files was read as a wrong value)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import zlib
from typing import Any

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from fec_jax import cli, reporting
from fec_jax.model import (
    SEGMENTERS,
    STAGE_NAME,
    create_model,
    init_from_models,
    is_stage,
    variable_shapes,
)

MODEL_ITEM = "model"
PARAMS_ITEM = "params"
BATCH_STATS_ITEM = "batch_stats"
EMA_PARAMS_ITEM = "ema_params"
OPT_STATE_ITEM = "opt_state"
PROGRESS_ITEM = "progress"
DATA_ITER_ITEM = "data_iterator"
CHECKSUMS_ITEM = "checksums"
MAX_LISTED = 20  # params listed by a mismatch error; the rest are counted


class CheckpointError(ValueError):
  """A checkpoint directory that is missing, empty or not an FEC checkpoint."""


class ParamsMismatch(CheckpointError):
  """A checkpoint's params that do not fit a model; `problems` lists them, one line each."""

  def __init__(self, message: str, problems: list[str]):
    super().__init__(message)
    self.problems = problems


class OtherModel(CheckpointError):
  """A workdir's run of another model than the config's, or of other create_model options
  (resumable_step); `fits`: whether its weights can start the config's model (init_from)."""

  def __init__(self, message: str, fits: bool):
    super().__init__(message)
    self.fits = fits


def model_metadata(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
  """JSON item describing the model; only JSON-serializable overrides are stored (not dtype)."""
  return {"name": name, "overrides": {k: v for k, v in overrides.items() if k != "dtype"}}


def save_params(
    directory: str, params, name: str, overrides: dict[str, Any], batch_stats=None
) -> None:
  """Writes a checkpoint of step 0 with the model description and its params (converter output),
  and the batch_stats of a model that has them (the fpn_* segmenters, and only they), in
  `directory`: a new or empty folder (CheckpointError otherwise, before anything is written).
  The params must be those of create_model(name, **overrides), which load_pretrained rebuilds:
  an unknown name or option is a ValueError, the whole variables a CheckpointError, params of
  another shape (other num_classes, another model) a ParamsMismatch listing them, and the
  batch_stats too (load_pretrained restores them at the model's shapes), before anything is
  written."""
  if (name in SEGMENTERS) != (batch_stats is not None):
    raise CheckpointError(
        f"{name} has BatchNorm statistics: pass batch_stats=variables['batch_stats']"
        if name in SEGMENTERS
        else f"{name} has no BatchNorm statistics: leave out batch_stats"
    )
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise CheckpointError(
        f"{directory} exists and is not an empty folder: save_params writes a new checkpoint "
        "directory (remove the old one first; convert_torch_weights.py --overwrite replaces one)"
    )
  if "params" in params:  # a model's params have no such module
    raise CheckpointError("save_params takes the params, variables['params'], not the variables")
  shapes = variable_shapes(create_model(name, **overrides))
  expected = shapes["params"]
  if _has_per_block_layout(params):  # that of fec-jax before 2026-11-27, which still loads
    expected = per_block_layout(expected)
  missing, unexpected, mismatched = compare_params(expected, params)
  s_missing, s_unexpected, s_mismatched = compare_params(
      shapes.get("batch_stats", {}), batch_stats or {}
  )
  prefix = lambda d: {f"batch_stats/{k}": v for k, v in d.items()}
  raise_for_mismatch(
      {**missing, **prefix(s_missing)},
      {**unexpected, **prefix(s_unexpected)},
      {**mismatched, **prefix(s_mismatched)},
      f"save_params({name!r}, {overrides})",
  )
  items = {PARAMS_ITEM: params}
  if batch_stats is not None:
    items[BATCH_STATS_ITEM] = batch_stats
  # load_pretrained restores the model's float32 variables (a bfloat16 array, stored as given, is
  # cast as it is read): the checksums are of those
  sums = _checksums(items, as_dtype=np.float32)
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True)) as mngr:
    mngr.save(
        0,
        args=ocp.args.Composite(
            **{MODEL_ITEM: ocp.args.JsonSave(model_metadata(name, overrides))},
            **{CHECKSUMS_ITEM: ocp.args.JsonSave(sums)},
            **{k: ocp.args.StandardSave(v) for k, v in items.items()},
        ),
        force=True,
    )
    mngr.wait_until_finished()


def _read_manager(directory: str) -> ocp.CheckpointManager:
  """A manager that only restores. Not `read_only=True`: that option only logs "Given directory
  is read only" (and a line per option it resets) on every load; nothing here saves."""
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))


def check_directory(directory: str, name: str = "checkpoint directory") -> None:
  """CheckpointError unless `directory` is a directory; the message calls it `name` and gives
  its absolute path (and a `~` that no one expanded: cli.home_in)."""
  if not os.path.isdir(directory):
    problem = "is a file" if os.path.exists(directory) else "does not exist"
    home = cli.home_in(directory)
    if home is not None and problem == "does not exist":
      problem += f" ({home!r} is not expanded here: os.path.expanduser)"
    shown = os.path.abspath(directory)
    torch_file = os.path.isfile(directory) and directory.endswith((".pth", ".pt", ".tar"))
    raise CheckpointError(
        f"{name} {shown} {problem}; expected the --output "
        "of convert_torch_weights.py or a train.py --workdir"
        + (f" (convert_torch_weights.py --input {shown} makes one)" if torch_file else "")
    )


def load_model(directory: str, step: int | None = None, **overrides) -> tuple[nn.Module, int]:
  """The model a checkpoint describes and its step (default: the latest), without the params:
  fast, so that a command checks its inputs against the model before the slow restore."""
  check_directory(os.fspath(directory))
  directory = os.path.abspath(os.fspath(directory))
  with _read_manager(directory) as mngr:
    steps = mngr.all_steps()
    if not steps:
      raise _no_steps(directory)
    step = max(steps) if step is None else step
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
      raise TypeError(f"step must be an int, a saved step of {directory}, got {step!r}")
    if step not in steps:
      if list(steps) == [0] and holds_weights_only(directory, 0):
        raise CheckpointError(  # saved steps: [0] said no more
            f"{directory} has no step {step}: it holds converted weights (a "
            "convert_torch_weights.py output), which are step 0 only; a step (--step, "
            "--config.init_from_step) is for a train.py run's workdir: leave it out"
        )
      raise CheckpointError(f"{directory} has no step {step}; saved steps: {sorted(steps)}")
    meta = _read_model_item(mngr, directory, step)
  return create_model(meta["name"], **{**meta["overrides"], **overrides}), step


def _no_steps(directory: str) -> CheckpointError:
  """The error for an absolute `directory` that holds no saved step, saying what it is instead
  where it can tell: a step or an item of a checkpoint, a folder of checkpoints, or a train.py
  run that saved no step yet."""
  parent, name = os.path.split(directory)
  if name.isdigit() and os.path.isdir(os.path.join(directory, MODEL_ITEM)):
    return CheckpointError(
        f"{directory} is step {name} of the checkpoint {parent}: give that directory "
        f"(and step {name} where the command takes a step, e.g. --step={name} or "
        f"--config.init_from_step={name})"
    )
  if os.path.basename(parent).isdigit() and os.path.isdir(os.path.join(parent, MODEL_ITEM)):
    return CheckpointError(
        f"{directory} is the item {name!r} of step {os.path.basename(parent)} of the "
        f"checkpoint {os.path.dirname(parent)}: give that directory"
    )
  inner = sorted(e.name for e in os.scandir(directory) if e.is_dir() and _holds_steps(e.path))
  hint = ""
  if inner:  # e.g. the folder of a converter output, or of train.py workdirs
    hint = (
        f" (it holds the checkpoint{'s' * (len(inner) > 1)} {reporting.listed(inner, 3)}: "
        f"give {'one' if inner[1:] else 'that'})"
    )
  elif reporting.holds_run_config(directory):  # a run stopped before its first save
    hint = (
        " (its config.json is a train.py run's, which saved no step yet: a run saves every "
        "config.checkpoint_every_steps steps and at its end)"
    )
  return CheckpointError(
      f"{directory} holds no checkpoint steps{hint}; expected the --output of "
      "convert_torch_weights.py or a train.py --workdir with a saved step"
  )


def _read_model_item(mngr: ocp.CheckpointManager, directory: str, step: int) -> dict[str, Any]:
  """The model item of a saved step, {"name", "overrides"} (model_metadata)."""
  try:
    args = ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonRestore()})
    meta = mngr.restore(step, args=args)[MODEL_ITEM]
  except (FileNotFoundError, KeyError, ValueError) as e:
    if _is_unreadable(e):  # model/metadata cut short
      raise _unreadable_step(mngr, step, e) from e
    step_dir = os.path.join(directory, str(step))
    if os.path.isdir(step_dir) and not os.path.isdir(os.path.join(step_dir, MODEL_ITEM)):
      raise CheckpointError(  # e.g. another command's output, named with digits
          f"{directory} step {step} is not an FEC checkpoint: {step_dir} has no item "
          f"'{MODEL_ITEM}', so no run saved it, but Orbax takes every numbered folder there for "
          f"a step: move it out of {directory}"
      ) from e
    raise CheckpointError(
        f"{directory} step {step} is not an FEC checkpoint with an item '{MODEL_ITEM}': {e}"
    ) from e
  # JSON that parses but is not model_metadata's (a changed byte, a key renamed): model/metadata
  # is corrupt, which create_model or _describe met as a KeyError or TypeError
  if not (
      isinstance(meta, dict)
      and isinstance(meta.get("name"), str)
      and isinstance(meta.get("overrides"), dict)
  ):
    bad = f"{MODEL_ITEM}/metadata is not {{'name': str, 'overrides': dict}}"
    raise _unreadable_step(mngr, step, ValueError(bad))
  return meta


def load_pretrained(
    directory: str, step: int | None = None, ema: bool = False, **overrides
) -> tuple[nn.Module, dict[str, Any]]:
  """Restores `(model, variables)` from a converter output or a train.py workdir.

  step: a saved step, an int (default: the latest). ema: restore the EMA weights of a train.py
  run.
  overrides: runtime model options such as `dtype=jnp.bfloat16` or `aggregation="onehot"`.
  `model.apply(variables, images)` then takes NHWC ImageNet-normalized float32 images.
  variables: {"params"}, and "batch_stats" for models that have them (the fpn_* segmenters).
  """
  model, step = load_model(directory, step, **overrides)
  directory = os.path.abspath(os.fspath(directory))
  item = EMA_PARAMS_ITEM if ema else PARAMS_ITEM
  if ema:
    check_ema(directory, step)
  shapes = variable_shapes(model)
  items = {"params": item}  # collection -> checkpoint item
  if "batch_stats" in shapes:
    items["batch_stats"] = BATCH_STATS_ITEM
  with _read_manager(directory) as mngr:
    try:
      saved = _saved_params(directory, step, item)
      per_block = _has_per_block_layout(saved)
      targets = {c: _local_target(shapes[c]) for c in items}
      if per_block:
        targets["params"] = per_block_layout(targets["params"])
      # Before any array is read: a model option that changes shapes (num_classes=...) is
      # one error naming the params, not Orbax's "Requested shape ... is not compatible".
      raise_for_mismatch(*compare_params(targets["params"], saved), f"{directory} step {step}")
      restored = _restore_arrays(
          mngr,
          step,
          ocp.args.Composite(**{i: ocp.args.StandardRestore(targets[c]) for c, i in items.items()}),
      )
    except CheckpointError:
      raise
    except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
      # e.g. params/manifest.ocdbt, a file of params/d/, _METADATA cut short or of another type
      if _is_unreadable(e):
        raise _unreadable_step(mngr, step, e) from e
      if isinstance(e, TypeError):  # a bug, not a checkpoint of another kind
        raise
      raise CheckpointError(
          f"{directory} step {step} is not an FEC checkpoint with items "
          f"'{MODEL_ITEM}' and {sorted(items.values())}: {e}"
      ) from e
  variables = {c: restored[i] for c, i in items.items()}
  if per_block:
    variables["params"] = stacked_layout(variables["params"], shapes["params"])
  return model, variables


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that, when closed with tasks pending, first lets them finish.

  Orbax runs a restore in a fresh event loop and closes it as soon as the gather of its array
  reads raises: the first unreadable array (a truncated file). The other reads are still in
  flight in TensorStore's threads; each then completes its asyncio future with
  loop.call_soon_threadsafe on the closed loop, and its RuntimeError('Event loop is closed') is
  printed as an unraisable exception, a traceback after the one-line error for every read."""

  def close(self) -> None:
    pending = [t for t in asyncio.all_tasks(self) if not t.done()]
    if pending and not self.is_running() and not self.is_closed():
      self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingLoop()


@contextlib.contextmanager
def _draining_event_loops():
  """asyncio.new_event_loop() makes a _DrainingLoop inside (Orbax's run_sync makes its loop
  so). The policy is the process's: a loop another thread makes meanwhile is one too, which
  differs only when closed with tasks pending. (Event loop policies are deprecated from Python
  3.14, removed in 3.16: then this needs another way in.)"""
  policy = asyncio.get_event_loop_policy()
  if type(policy) is not asyncio.DefaultEventLoopPolicy:  # e.g. uvloop's: left as it is
    yield
    return
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(policy)


def _restore_arrays(mngr: ocp.CheckpointManager, step: int, args: ocp.args.Composite):
  """mngr.restore(step, args); a CheckpointError where an array's data cannot be read (a file
  truncated or corrupt: Orbax raises a bare Exception whose cause is TensorStore's ValueError),
  or its metadata (_is_unreadable: a resume reads no metadata before), or where an array read
  differs from the one saved (its checksum, when the step has them: _check_sums)."""
  has_sums = CHECKSUMS_ITEM in saved_items(os.fspath(mngr.directory), step)
  if has_sums:
    args = ocp.args.Composite(**{CHECKSUMS_ITEM: ocp.args.JsonRestore()}, **dict(args.items()))
  try:
    with _draining_event_loops():
      restored = mngr.restore(step, args=args)
  except Exception as e:
    if _is_unreadable(e):  # the metadata read before the arrays (as in load_pretrained)
      raise _unreadable_step(mngr, step, e) from e
    if type(e) is not Exception or not isinstance(e.__cause__, (ValueError, OSError)):
      raise
    raise _unreadable_step(mngr, step, e.__cause__) from e
  if has_sums:
    _check_sums(mngr, step, restored)
  return restored


def _local_whole(a):
  """An array whose values this process holds whole: a jax.Array of this process's devices
  itself, the first local copy of one replicated over other processes' too; None for one that is
  sharded over processes (not in train.py, whose state is replicated)."""
  if not isinstance(a, jax.Array) or a.is_fully_addressable:
    return a
  shard = a.addressable_shards[0].data
  return shard if shard.shape == a.shape else None


def _checksums(items: dict[str, Any], as_dtype=None) -> dict[str, list[int | None]]:
  """{item: [CRC-32 of each array's bytes (C order), in leaf order]} (None where this process
  does not hold all of an array, which is then not checked); `as_dtype`: of the arrays cast to it
  (the dtype a restore reads them as, where that is not the one saved)."""
  # one device_get: the copies to the host start together, not one after the other
  hosts = jax.device_get(
      {item: [_local_whole(a) for a in jax.tree.leaves(tree)] for item, tree in items.items()}
  )
  crc = lambda x: zlib.crc32(np.ascontiguousarray(x, as_dtype).reshape(-1).view(np.uint8))
  return {item: [None if x is None else crc(x) for x in xs] for item, xs in hosts.items()}


def _check_sums(mngr: ocp.CheckpointManager, step: int, restored) -> None:
  """The truncated-step CheckpointError where an array restored from `step` is not the one
  saved: its CRC-32 differs from the item CHECKSUMS_ITEM's (a byte of a data file changed)."""
  saved = restored[CHECKSUMS_ITEM]
  items = {k: restored[k] for k in restored.keys() if k not in (CHECKSUMS_ITEM, DATA_ITER_ITEM)}
  for item in items:  # the item's JSON parses but is not _checksums' (a changed byte, a key)
    if not isinstance(saved, dict) or not isinstance(saved.get(item), list):
      bad = f"{CHECKSUMS_ITEM}/metadata holds no list of checksums of {item}"
      raise _unreadable_step(mngr, step, ValueError(bad))
  found = _checksums(items)
  for item, sums in found.items():
    leaves = jax.tree_util.tree_flatten_with_path(items[item])[0]
    if len(saved[item]) != len(sums):
      bad = f"{item} holds {len(sums)} arrays, its checksums are of {len(saved[item])}"
      raise _unreadable_step(mngr, step, ValueError(bad))
    for (path, _), want, got in zip(leaves, saved[item], sums):
      if None not in (want, got) and want != got:
        name = f"{item}{jax.tree_util.keystr(path)}"
        raise _unreadable_step(
            mngr, step, ValueError(f"{name} differs from the array saved (its CRC-32)")
        )


# Where Orbax parses its JSON metadata files (_METADATA, array_metadatas/) and grain a train
# iterator's state (data_iterator/process_*.json): a KeyError or TypeError raised there is of a
# file that parses but holds what this version does not read (a key renamed, a value of another
# type), and so is a ValueError raised in one of Orbax's parsers there (_ORBAX_PARSERS): its
# from_json (a value outside its enum: a key_type 7), or the empty value a restore puts for a leaf
# that _METADATA marks as no array (skip_deserialize true: "Unrecognized typestr: jax.Array");
# other ValueErrors there may be of a restore's arguments. Another version of Orbax, of grain or
# of the pipeline whose state grain writes (get_state) writes such files, as a changed byte may:
# the step records no versions, so the error names this run's
_JSON_READERS = re.compile(r"orbax\.checkpoint\._src\.metadata\.|grain\._src\.python\.checkpoint\.")
_JSON_ERRORS = (KeyError, TypeError, ValueError)
_ORBAX_PARSERS = ("from_json", "get_empty_value_from_typestr")


def _json_reader(e: BaseException) -> tuple[str, str] | None:
  """What file `e`, one of _JSON_ERRORS, was raised reading (_JSON_READERS), and what writes
  that file, in words; None where none of those (or for a ValueError, in none of Orbax's parsers
  there: _ORBAX_PARSERS)."""
  tb = e.__traceback__
  while tb is not None:
    m = _JSON_READERS.match(tb.tb_frame.f_globals.get("__name__", ""))
    if m and (not isinstance(e, ValueError) or tb.tb_frame.f_code.co_name in _ORBAX_PARSERS):
      if m.group().startswith("grain"):
        return (
            f"the train iterator's state, {DATA_ITER_ITEM}/process_*.json",
            f"grain (this is grain {grain.__version__}) or of the train data pipeline",
        )
      return (
          "Orbax's metadata of an item, its _METADATA, array_metadatas/ or _sharding",
          f"Orbax (this is orbax-checkpoint {ocp.__version__})",
      )
    tb = tb.tb_next
  return None


def _is_unreadable(e: Exception) -> bool:
  """Whether `e`, from reading a step's metadata, says a file is cut short or corrupt:
  TensorStore's DATA_LOSS (a manifest shorter than its header says) or OUT_OF_RANGE (a byte
  range past the end of a file), or a JSON file that does not parse (_METADATA; _sharding,
  which TensorStore reads: FAILED_PRECONDITION ... Invalid JSON), or one that parses without the
  keys its reader looks up (_sharding: NOT_FOUND ... JSON Pointer) or with a value it refuses
  (_JSON_READERS), or marks a saved array as no array (_NotAnArray)."""
  if isinstance(e, _NotAnArray) or isinstance(e, _JSON_ERRORS) and _json_reader(e) is not None:
    return True
  return isinstance(e, json.JSONDecodeError) or bool(
      re.match(
          r"(DATA_LOSS|OUT_OF_RANGE): |FAILED_PRECONDITION: .*: Invalid JSON|NOT_FOUND: .*JSON "
          r"Pointer",
          str(e),
      )
  )


def _unreadable_step(mngr: ocp.CheckpointManager, step: int, cause: BaseException):
  """The CheckpointError for a step with a file truncated or corrupt, or one that another version
  of its writer wrote (_json_reader): the first line of `cause`, without the TensorStore spec (a
  thousand characters) that TensorStore appends."""
  step_dir = os.path.join(os.fspath(mngr.directory), str(step))
  first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
  first_line = re.sub(r" \[tensorstore_spec='.*$", "", first_line)
  problem = "a file of this step is truncated or corrupt"
  if isinstance(cause, _JSON_ERRORS) and (reader := _json_reader(cause)):
    file, writer = reader
    first_line = f"{type(cause).__name__} {first_line} reading {file}"
    problem = f"that file was written by another version of {writer}, or is damaged"
  return CheckpointError(
      f"{step_dir} cannot be read ({first_line}): {problem}; "
      f"saved steps: {sorted(mngr.all_steps())} (another is read with --step=N or "
      f"--config.init_from_step=N; to resume from an earlier one, move {step_dir} out of the "
      f"workdir)"
  )


def check_ema(directory: str, step: int) -> None:
  """A CheckpointError where `step` of `directory` holds no EMA weights (fast: item names only),
  for a command that checks its inputs before slow work."""
  if EMA_PARAMS_ITEM not in saved_items(directory, step):
    raise CheckpointError(
        f"{directory} step {step} holds no EMA weights (a converter output, or a train.py run "
        "with ema_decay 0); leave out the EMA option (--ema; for init_from, init_from_ema)"
    )


def saved_items(directory: str, step: int) -> set[str]:
  """The item names a saved step holds ('model', 'params', 'ema_params', ...): its folders."""
  path = os.path.join(directory, str(step))
  return {name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name))}


def holds_weights_only(directory: str, step: int) -> bool:
  """Whether `step` of `directory` is weights only (a convert_torch_weights.py output, saved as
  step 0), not a train.py run's step (which saves its progress too)."""
  return PROGRESS_ITEM not in saved_items(directory, step)


def weights_name(directory: str, step: int, ema: bool = False) -> str:
  """How a command names the weights it read: 'step N' (', EMA weights') of a train.py run, or
  'converted weights' for weights only (holds_weights_only)."""
  if holds_weights_only(directory, step):
    return "converted weights"
  return f"step {step}{', EMA weights' if ema else ''}"


def check_is_run(directory: str, step: int) -> set[str]:
  """The items of `step` (saved_items); a CheckpointError where they are weights only (a
  convert_torch_weights.py output, a save_params): nothing that train.py resumes."""
  items = saved_items(directory, step)
  if not {OPT_STATE_ITEM, PROGRESS_ITEM, DATA_ITER_ITEM} <= items:
    raise CheckpointError(
        f"{directory} holds weights (step {step}: {sorted(items)}), not a train.py run to resume; "
        f"to start from them, use a new --workdir with --config.init_from={directory}"
    )
  return items


def replaceable_checkpoint(directory: str) -> bool:
  """Whether --overwrite may delete `directory`: it holds an FEC checkpoint and nothing but its
  step directories (a train.py workdir, with its metrics and logs, is not replaced). The entries
  first: a workdir is told by its files without Orbax reading its steps (which logs a warning for
  a numbered directory that is not one, such as a new --workdir named 7 in it)."""
  if not os.path.isdir(directory):
    return False
  if not all(os.path.isdir(os.path.join(directory, entry)) for entry in os.listdir(directory)):
    return False
  try:
    load_model(directory)
  except CheckpointError:
    return False
  return True


def _inside_checkpoint(output: str, checkpoint: str) -> bool:
  """Whether `output` lies in `checkpoint`'s directories: anywhere in a converter output (its
  directory holds only its steps) and in a workdir's subdirectories (a run deletes an old step's
  directory with what it holds); a workdir's top level is not the checkpoint's."""
  real_output, real_checkpoint = os.path.realpath(output), os.path.realpath(checkpoint)
  if os.path.commonpath([real_output, real_checkpoint]) != real_checkpoint:
    return False
  return os.path.dirname(real_output) != real_checkpoint or replaceable_checkpoint(checkpoint)


def _holds_steps(directory: str) -> bool:
  """Whether `directory` holds a saved step (a numbered directory with a model item): it is a
  checkpoint (a converter output or a train.py workdir)."""
  try:
    steps = [e for e in os.listdir(directory) if e.isdigit()]
  except OSError:  # a directory yet to be made, or one we may not list
    return False
  return any(os.path.isdir(os.path.join(directory, s, MODEL_ITEM)) for s in steps)


def _checkpoint_around(path: str) -> str | None:
  """The checkpoint directory that `path` would lie inside (see _inside_checkpoint), or None:
  the parents that hold a saved step (a numbered directory with a model item) are candidates,
  those of the real path (a link to a checkpoint's directory leads inside it)."""
  parent = os.path.dirname(os.path.realpath(path))
  while True:
    if _holds_steps(parent) and _inside_checkpoint(path, parent):
      return parent
    if os.path.dirname(parent) == parent:
      return None
    parent = os.path.dirname(parent)


def output_in_a_checkpoint(output: str, flag: str, read: str | None = None) -> str | None:
  """Why `output` (a directory or file a command writes, given as `flag`) would harm a
  checkpoint, or None: it lies in the checkpoint `read` (--to-torch's --input) or in another
  checkpoint (see _inside_checkpoint), or it is a numbered name beside a checkpoint's steps (or
  one of them), which Orbax takes for a step (every command on a workdir then fails on its latest
  step)."""
  checkpoint = f"--input {read}" if read and _inside_checkpoint(output, read) else None
  checkpoint = checkpoint or _checkpoint_around(output)
  if checkpoint:
    return (
        f"{flag} {output} is inside the checkpoint {checkpoint}: write it outside the "
        "checkpoint's directories (a run deletes an old step's directory with what it holds; "
        "a converter output's directory holds only its steps)"
    )
  # The entry as named (in its real parent) counts as well as the real path: a link named 7 in a
  # workdir is a step to Orbax, wherever it leads.
  given = output.rstrip(os.sep) or os.sep
  entry = os.path.join(os.path.realpath(os.path.dirname(given)), os.path.basename(given))
  for path in dict.fromkeys((entry, os.path.realpath(output))):
    name, parent = os.path.basename(path), os.path.dirname(path)
    if name.isdigit() and _holds_steps(parent):
      is_step = os.path.isdir(os.path.join(path, MODEL_ITEM))  # one the run saved
      return (
          f"{flag} {output} {'is' if is_step else 'would be taken for'} step {int(name)} of the "
          f"checkpoint {parent} (its steps are its numbered directories): give the output a name "
          "that is not a number"
      )
  return None


def resumable_step(workdir: str, name: str, overrides: dict[str, Any], ema: bool) -> int | None:
  """The latest step of a train.py workdir that a run of model `name` (create_model overrides,
  with or without EMA) can resume from; None for a new or empty workdir. Reads
  only the model item and the item names, so that a misfit stops the run before anything slow."""
  directory = os.path.abspath(workdir)
  problem = cli.not_a_directory(directory)  # a file, or a broken link, in the way
  if problem is not None:
    raise CheckpointError(f"--workdir {directory}: {problem}; expected a directory")
  problem = output_in_a_checkpoint(directory, "--workdir")
  if problem is not None:
    raise CheckpointError(problem)
  existing = directory  # the workdir, or the folder it will be created in
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK | os.X_OK):
    raise CheckpointError(f"--workdir {directory}: {existing} is not writable")
  if existing != directory:
    return None
  with _read_manager(directory) as mngr:
    step = mngr.latest_step()
    if step is None:
      return None
    saved = _read_model_item(mngr, directory, step)
  items = check_is_run(directory, step)
  wanted = model_metadata(name, overrides)
  if saved != wanted:
    fits = saved["name"] in init_from_models(name)
    raise OtherModel(
        f"{directory} holds a run of {_describe(saved)}; the config asks for {_describe(wanted)}. "
        "Resume it with its own config (leave out --config where the workdir has a config.json: "
        "train.py then takes it), or start a new --workdir"
        + (f" (--config.init_from={directory} to fine-tune from it)" if fits else ""),
        fits,
    )
  if ema and EMA_PARAMS_ITEM not in items:
    raise CheckpointError(
        f"the run in {directory} kept no EMA weights; resume it with --config.ema_decay=0"
    )
  saved_processes = _iterator_processes(os.path.join(directory, str(step), DATA_ITER_ITEM))
  if saved_processes not in (None, jax.process_count()):
    processes = reporting.counted(saved_processes, "process")
    raise CheckpointError(
        f"{directory} step {step} was saved by a run of {processes}, each with its own "
        f"position in the train data; resume it with {processes} "
        f"(this run has {jax.process_count()}; the number of devices per process may change)"
    )
  return step


def _iterator_processes(directory: str) -> int | None:
  """The process count of the run that saved these train iterator states (grain writes
  process_<i>-of-<n>.json per process); None where none is found."""
  counts = {
      int(m.group(1))
      for m in (re.fullmatch(r"process_\d+-of-(\d+)\.json", f) for f in os.listdir(directory))
      if m
  }
  return counts.pop() if len(counts) == 1 else None


def _describe(meta: dict[str, Any]) -> str:
  options = ", ".join(f"{k} {v}" for k, v in sorted(meta["overrides"].items()))
  return f"{meta['name']} ({options})"


# A stage's blocks run as one nn.scan (fec_jax.model), with their params stacked on a leading
# block axis under the stage's name (`network_0/mlp/fc1/kernel` [depth, ...]). Checkpoints written
# before that (fec-jax up to 2026-11-26) hold one module per block (`network_0_2/mlp/fc1/kernel`):
# load_pretrained reads them (so eval.py, visualize.py, --to-torch and init_from do), a training
# run does not resume from them.
_PER_BLOCK_NAME = re.compile(STAGE_NAME.pattern + r"_\d+")


class _NotAnArray(ValueError):
  """A leaf of a saved params, ema_params or opt_state item that its _METADATA marks as no
  array."""


def _saved_tree(directory, step: int, item: str) -> Any:
  """A saved item's tree of array metadata (names, shapes, dtypes; no arrays read)."""
  with _draining_event_loops():  # it opens every array: a truncated manifest fails them all
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(step) / item).tree
  # fec-jax saves only arrays in the items read so; a leaf without a shape is a _METADATA whose
  # "skip_deserialize" became true (or another true value), to Orbax a value it does not read
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not hasattr(leaf, "shape"):
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      raise _NotAnArray(f"{item}/_METADATA marks {name} as no array")
  return tree


def _saved_params(directory, step: int, item: str) -> dict[str, Any]:
  """A saved params item's tree of array metadata."""
  return dict(_saved_tree(directory, step, item))


def _has_per_block_layout(saved: dict[str, Any]) -> bool:
  """Whether a saved params tree (_saved_params) has that layout."""
  names = flax.traverse_util.flatten_dict(saved)
  return any(_PER_BLOCK_NAME.fullmatch(name) for path in names for name in path)


def per_block_layout(tree):
  """Stacked stage variables (arrays or ShapeDtypeStructs) -> one subtree per block."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for name, subtree in tree.items():
    if not is_stage(name):
      out[name] = per_block_layout(subtree)
      continue
    for j in range(jax.tree.leaves(subtree)[0].shape[0]):
      out[f"{name}_{j}"] = jax.tree.map(lambda a: _block(a, j), subtree)
  return out


def _block(a, j: int):
  if isinstance(a, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=a.sharding)
  return a[j]


def stacked_layout(tree, like):
  """Inverse of per_block_layout: `tree` in the per-block layout, stacked as `like` is."""
  if not isinstance(like, dict):
    return tree
  out = {}
  for name, subtree in like.items():
    if is_stage(name):
      blocks = [tree[f"{name}_{j}"] for j in range(jax.tree.leaves(subtree)[0].shape[0])]
      out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    else:
      out[name] = stacked_layout(tree[name], subtree)
  return out


def _local_target(shapes):
  """`shapes` (ShapeDtypeStructs) on this process's first device, so that variables saved from
  any mesh (e.g. replicated over 8 devices by train.py) restore here."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def training_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The train.py manager: the workdir is the root, the last `keep` steps are kept, saves are
  asynchronous and half-written steps of a killed run are cleaned up on start."""
  return ocp.CheckpointManager(
      os.path.abspath(workdir),
      options=ocp.CheckpointManagerOptions(
          create=True,
          preservation_policy=ocp.checkpoint_managers.LatestN(keep),
          cleanup_tmp_directories=True,
          enable_async_checkpointing=True,
      ),
  )


def _training_items(state) -> dict[str, Any]:
  items = {
      PARAMS_ITEM: state.params,
      OPT_STATE_ITEM: state.opt_state,
      PROGRESS_ITEM: {"step": state.step, "rng": state.rng},
  }
  if state.ema_params is not None:
    items[EMA_PARAMS_ITEM] = state.ema_params
  items.update(state.model_state)  # one item per collection, e.g. batch_stats
  return items


def save_training(
    mngr: ocp.CheckpointManager, state, name: str, overrides: dict[str, Any], data_iter
) -> None:
  """Starts an asynchronous save of a training state (fec_jax.training.TrainState) at its step,
  with the model description and the train iterator's position."""
  items = _training_items(state)
  args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
  mngr.save(
      int(state.step),
      args=ocp.args.Composite(
          **{
              MODEL_ITEM: ocp.args.JsonSave(model_metadata(name, overrides)),
              CHECKSUMS_ITEM: ocp.args.JsonSave(_checksums(items)),
              DATA_ITER_ITEM: grain.checkpoint.CheckpointSave(data_iter),
              **args,
          }
      ),
      force=True,
  )


def restore_training(mngr: ocp.CheckpointManager, abstract_state, data_iter, step: int):
  """Restores `step` into the shapes and shardings of `abstract_state` (a TrainState of
  jax.ShapeDtypeStruct) and moves `data_iter` to the saved position; returns the state."""
  try:  # the metadata of params and opt_state, read before the restore
    per_block = _has_per_block_layout(_saved_params(mngr.directory, step, PARAMS_ITEM))
    # a step of per-block params may have no opt_state
    saved = None if per_block else _saved_tree(mngr.directory, step, OPT_STATE_ITEM)
  except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
    if _is_unreadable(e):  # e.g. _METADATA or manifest.ocdbt cut short, or a key of it renamed
      raise _unreadable_step(mngr, step, e) from e
    raise
  if per_block:
    raise CheckpointError(
        f"step {step} was written by an earlier fec-jax (one module per block, e.g. network_0_2): "
        "a run cannot resume from it; start a new workdir with --config.init_from=<this workdir>"
    )
  targets = _training_items(abstract_state)
  opt_state = targets[OPT_STATE_ITEM]
  # A run with weight_decay_on="all" saved before ClusterPool's conv_f left weight decay had an
  # AdamW without a mask: the same arrays, without the mask's (leaf-less) state node.
  unmasked = _count_masks(saved) < _count_masks(opt_state)
  if unmasked:
    targets[OPT_STATE_ITEM] = _without_masks(opt_state)
  restored = _restore_arrays(
      mngr,
      step,
      ocp.args.Composite(
          **{k: ocp.args.StandardRestore(v) for k, v in targets.items()},
          **{DATA_ITER_ITEM: grain.checkpoint.CheckpointRestore(data_iter)},
      ),
  )
  restored_opt_state = restored[OPT_STATE_ITEM]
  if unmasked:
    leaves = jax.tree.leaves(restored_opt_state)
    restored_opt_state = jax.tree.unflatten(jax.tree.structure(opt_state), leaves)
  return abstract_state.replace(
      step=restored[PROGRESS_ITEM]["step"],
      rng=restored[PROGRESS_ITEM]["rng"],
      params=restored[PARAMS_ITEM],
      opt_state=restored_opt_state,
      model_state={c: restored[c] for c in abstract_state.model_state},
      ema_params=restored[EMA_PARAMS_ITEM] if EMA_PARAMS_ITEM in targets else None,
  )


def _masked(node) -> bool:
  return isinstance(node, optax.MaskedState)


def _without_masks(opt_state):
  """An optax state with each optax.masked node replaced by the state it wraps."""
  return jax.tree.map(lambda n: n.inner_state if _masked(n) else n, opt_state, is_leaf=_masked)


def _count_masks(tree) -> int:
  """The optax.masked nodes of an optax state, or of its saved metadata tree (where each is a
  dict with the key 'inner_state')."""
  if _masked(tree):
    return 1 + _count_masks(tree.inner_state)
  if isinstance(tree, dict):
    return ("inner_state" in tree) + sum(_count_masks(v) for v in tree.values())
  if isinstance(tree, (list, tuple)):
    return sum(_count_masks(v) for v in tree)
  return 0


# ----------------------------------------------------------------------------- fine-tuning


def compare_params(expected, found) -> tuple[dict, dict, dict]:
  """Two params trees -> ({name: shape} missing from `found`, {name: shape} unexpected in
  `found`, {name: (expected shape, found shape)} of the names in both); names 'a/b/kernel'."""
  shapes = lambda tree: {
      k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()
  }
  want, have = shapes(expected), shapes(found)
  return (
      {k: v for k, v in want.items() if k not in have},
      {k: v for k, v in have.items() if k not in want},
      {k: (v, have[k]) for k, v in want.items() if k in have and have[k] != v},
  )


def reinit_classifier(
    mismatched: dict, keys: tuple[str, ...], name: str, source: str
) -> tuple[set[str], dict, list[str]]:
  """The classifier's params `keys` (e.g. 'head/kernel') are re-initialized when only their
  number of classes (the last dim) differs from `source`'s. `mismatched` as compare_params gives
  it -> (the re-initialized keys, the other mismatches, a note on the change if any)."""
  reinit = set(keys) & set(mismatched)
  if not reinit or any(mismatched[k][0][:-1] != mismatched[k][1][:-1] for k in reinit):
    return set(), mismatched, []
  expected, found = mismatched[min(reinit)]  # shapes [..., num_classes]
  note = (
      f"{name} re-initialized for {reporting.counted(expected[-1], 'class')} "
      f"({source} has {found[-1]}); the other "
      "weights come from it"
  )
  return reinit, {k: v for k, v in mismatched.items() if k not in reinit}, [note]


def merge_params(params, loaded, keep: set[str]):
  """`params` with each leaf taken from `loaded` (same names; `loaded` may hold more) except
  the names 'a/b/kernel' in `keep`, which keep their value in `params`."""
  found = flax.traverse_util.flatten_dict(loaded, sep="/")
  merged = {
      k: v if k in keep else found[k]
      for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()
  }
  return flax.traverse_util.unflatten_dict(merged, sep="/")


def raise_for_mismatch(missing: dict, unexpected: dict, mismatched: dict, source: str) -> None:
  """Raises ParamsMismatch listing every missing, unexpected and mis-shaped param (one line
  each: name, expected, found; the first MAX_LISTED in the message); nothing when all three are
  empty."""
  lines = (
      [f"  mis-shaped {k}: expected {e}, found {f}" for k, (e, f) in sorted(mismatched.items())]
      + [f"  missing    {k}: expected {v}, found nothing" for k, v in sorted(missing.items())]
      + [f"  unexpected {k}: expected nothing, found {v}" for k, v in sorted(unexpected.items())]
  )
  if lines:
    shown = lines[:MAX_LISTED] + (
        [f"  ... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
    )
    raise ParamsMismatch(
        f"the params of {source} do not fit this model "
        f"({reporting.counted(len(lines), 'problem')}):\n" + "\n".join(shown),
        lines,
    )
