"""What the input pipelines share (classification, fec_jax.data.pipeline; segmentation,
fec_jax.data.seg_pipeline): the train and val orders, the reader that replaces or masks out bad
files, and the loader that makes a pipeline's elements in worker processes, resumably.

Train order (like torch's DistributedSampler, which the official script uses): each
epoch e draws a global permutation of the N records from (seed, e); host h of H takes
positions h, h + H, h + 2H, ... and the per-host epoch is cut to a whole number of
local batches (drop remainder). A pipeline draws every example's augmentation from its own
generator seeded with (seed, e, global position).

Batches are made before the worker processes: the elements of the grain dataset are whole
batches, grain hands batch i to worker i % W and takes them back in turn. So a batch does not
depend on the number of hosts' worker processes or threads, nor on where a run was resumed, and
the iterator's state is the number of batches read: a resume may use another number of
workers.

Val order: the records in source order, position p on host p % H, padded to a whole number of
global batches, so every host runs the same number of eval steps and each real example is
counted exactly once; a pipeline masks the padding out (mask False).

Bad input (unreadable, truncated, corrupt files): in train, the next record in source order
that decodes takes the bad one's place (with its own label), as in timm's ImageDataset, which
the official script reads ImageNet with, so a batch keeps its size and an epoch its length; a
split with no readable record is DataNotFoundError. Val keeps the slot with mask False. A
pipeline's examples count their bad files and the images converted to RGB; the loader takes the
counts out, logs them once per epoch and keeps them in the iterator state (`stats()` returns
them).
"""

import atexit
import functools
import gc
import logging
import multiprocessing
from multiprocessing import spawn as mp_spawn
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading

import grain
from absl import flags
from absl import logging as absl_logging
from grain.multiprocessing import SharedMemoryArray
import numpy as np

from fec_jax import reporting
from fec_jax.data import sources, transforms

log = logging.getLogger(__name__)


def check_split(split: str, shard_index: int, shard_count: int) -> None:
  """ValueError for a split other than 'train' and 'val' or a shard_index outside
  [0, shard_count)."""
  sources.check_split(split)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")


def _check_counts(batch: int, shard_count: int, what: str = "batch") -> None:
  """ValueError for a batch or a shard count below 1 (a division by zero below)."""
  if batch < 1 or shard_count < 1:
    raise ValueError(f"the {what} ({batch}) and the shard count ({shard_count}) must be at least 1")


def local_batch(global_batch_size: int, shard_count: int) -> int:
  """The per-host batch, global_batch_size // shard_count (ValueError if either is below 1 or it
  does not divide)."""
  _check_counts(global_batch_size, shard_count, "global batch")
  if global_batch_size % shard_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {shard_count} shards")
  return global_batch_size // shard_count


def epoch_steps(n: int, batch: int, shard_count: int) -> int:
  """Train batches per epoch per host for n records: (n // shard_count) // batch, the rest of
  each host's share dropped."""
  _check_counts(batch, shard_count)
  return (n // shard_count) // batch


def val_steps(n: int, batch: int, shard_count: int) -> int:
  """Val batches per host for one pass over n records: ceil(n / (batch * shard_count)), the
  last global batch padded (the padding is masked)."""
  _check_counts(batch, shard_count)
  return -(-n // (batch * shard_count))


# The examples of an endless train order: grain's batch() takes its length as
# ceil(len(parent) / batch_size) in floats, exact up to 2**53 (sys.maxsize examples, rounded up
# to 2**63, made a local batch of 1 fail: "cannot fit 'int' into an index-sized integer").
ENDLESS = 2**53


def train_order(n: int, batch: int, shard_index: int, shard_count: int, seed, num_epochs):
  """(host-local train index -> (record, epoch, position), batches per epoch, examples in all)
  for n records: whole epochs of whole local batches of `batch` examples, `num_epochs` of them
  (None: up to ENDLESS examples, endless in practice)."""
  per_host_epoch = epoch_steps(n, batch, shard_count) * batch
  if per_host_epoch == 0:
    raise ValueError(
        f"{reporting.counted(n, 'train example')}, fewer than one global batch "
        f"({batch * shard_count}); lower config.global_batch_size"
    )
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (endless) or at least 1, got {num_epochs}")
  epochs = num_epochs or ENDLESS // per_host_epoch
  order = _TrainOrder(n, per_host_epoch, shard_index, shard_count, seed)
  return order, per_host_epoch // batch, per_host_epoch * epochs


class _TrainOrder:
  """Host-local train index k -> (record index, epoch, global position) (module doc)."""

  def __init__(self, num_records, per_host_epoch, shard_index, shard_count, seed):
    self._perm = grain.MapDataset.range(num_records).shuffle(seed=seed % 2**32)
    self._n, self._per_host = num_records, per_host_epoch
    self._shard_index, self._shard_count = shard_index, shard_count

  def __call__(self, k: int):
    epoch, j = divmod(k, self._per_host)
    position = j * self._shard_count + self._shard_index
    return self._perm[epoch * self._n + position], epoch, position


def val_order(n: int, batch: int, shard_index: int, shard_count: int):
  """(host-local val index -> (record or -1, 0, position), batches, examples in all) for n
  records: one pass, padded to a whole number of global batches (batch * shard_count)."""
  steps = val_steps(n, batch, shard_count)
  return _ValOrder(n, shard_index, shard_count), steps, steps * batch


class _ValOrder:
  """Host-local val index j -> (record index or -1 for padding, 0, global position)."""

  def __init__(self, num_records, shard_index, shard_count):
    self._n, self._shard_index, self._shard_count = num_records, shard_index, shard_count

  def __call__(self, j: int):
    position = j * self._shard_count + self._shard_index
    return (position if position < self._n else -1), 0, position


class Reader:
  """Reads record `index` of a source and decodes it with `decode(record)`, which raises
  transforms.BadImageError for a bad file; shared by the classification and segmentation
  pipelines. train: a bad record is replaced by the next one in source order that decodes,
  wrapping at the end (timm's ImageDataset does the same), and a split without one is
  DataNotFoundError naming `where` and the first bad file's error. val: the caller masks a bad
  record out. A bad file is logged when this process first reads it (two threads may both log it)
  and not read again by it."""

  def __init__(
      self,
      source,
      decode,
      train: bool,
      where: str,
      files: str = "image files",
      record: str = "image",
  ):
    self._source, self._decode, self._train, self._where = source, decode, train, where
    # What a record's files are and what a record is, for the error of a split with none good
    self._files, self._record = files, record
    self._bad = set()  # record indices that failed to decode in this process
    self._first_bad = ""  # "key: error" of the first of them

  def __call__(self, index: int):
    """(record, decode(record), whether the record at `index` was bad); (None, None, True)
    for a bad val record."""
    n = len(self._source)
    for tries in range(n if self._train else 1):
      i = (index + tries) % n
      if i in self._bad:  # a run of bad records costs set lookups, not file reads
        continue
      record = self._source[i]
      try:
        return record, self._decode(record), tries > 0
      except transforms.BadImageError as e:
        self._bad.add(i)
        key = sources.one_line(record["key"])
        self._first_bad = self._first_bad or f"{key}: {e}"
        what = "replaced by the next readable record (train)" if self._train else "masked out (val)"
        log.warning("bad file %s %s: %s", key, what, e)
    if self._train:
      raise sources.DataNotFoundError(
          f"no readable {self._record} in the {n} train records of {self._where}; expected "
          f"{self._files} that decode (the first bad file, {self._first_bad}; the warnings above "
          "name every one)"
      )
    return None, None, True


class Loader(grain.IterDataset):
  """The elements of `elements` (a grain MapDataset of batches, or of segmentation's val
  examples) made in data_config.num_workers worker processes (fewer for a pass of fewer
  elements), with the bad/converted counts taken out and logged once per epoch of
  `steps_per_epoch` elements. Each `iter()` is a fresh pass with its own worker processes."""

  def __init__(self, elements, data_config, steps_per_epoch: int, split: str):
    super().__init__()
    self._args = (elements, data_config, steps_per_epoch, split)

  def __iter__(self):
    return _LoaderIterator(*self._args)


class _LoaderIterator(grain.DatasetIterator):
  """Its state is the number of elements read (and the counts): a restore opens the grain
  pipeline at that element, with any number of workers. A state of an earlier fec-jax resumes
  at its step too; its batches depended on the number of workers, so with more than one worker
  the batches from there on are grouped as this version groups them."""

  def __init__(self, elements, data_config, steps_per_epoch: int, split: str):
    super().__init__()
    self._elements, self._cfg = elements, data_config
    self._steps_per_epoch, self._split = steps_per_epoch, split
    self._step, self._bad, self._converted = 0, 0, 0
    self._epoch_start = (0, 0)
    self._iterator = None  # the grain pipeline from self._step on, opened at the first next()
    self._spawn_held = False  # whether this iterator holds _hold_spawn()
    self._workers = 0  # the worker processes of self._iterator

  def _start(self):
    """Opens the grain pipeline from self._step on and returns its first element. No more
    workers than elements left, and none for one: a worker is a Python process that starts in
    seconds, and gains only where some elements are made while others are used (a small val
    split of one batch: eval.py on 43 images took 22 s with 2 workers, 13 s without)."""
    left = len(self._elements) - self._step
    self._workers = workers = min(_num_workers(self._cfg), left) if left > 1 else 0
    if workers and not self._spawn_held:
      _hold_spawn()
      self._spawn_held = True
    if workers:
      _free_shared_memory_at_exit()
    ds = self._elements[self._step :].to_iter_dataset(
        grain.ReadOptions(
            num_threads=self._cfg.read_threads, prefetch_buffer_size=self._cfg.read_threads
        )
    )
    self._iterator = iter(_prefetch(ds, self._cfg, workers))
    return next(self._iterator)

  def __next__(self):
    self._assert_not_closed()
    batch = dict(self._start() if self._iterator is None else next(self._iterator))
    _unlink_now(batch)
    self._bad += int(np.sum(batch.pop("num_bad")))
    self._converted += int(np.sum(batch.pop("num_converted")))
    if self._split == "train":
      del batch["mask"]
    self._step += 1
    if self._step % self._steps_per_epoch == 0:
      bad, converted = self._bad - self._epoch_start[0], self._converted - self._epoch_start[1]
      if self._split == "train":
        what = f"train epoch {self._step // self._steps_per_epoch - 1}"
      else:  # each evaluation reads the split once, with a fresh iterator
        what = self._split
      log.info(
          "%s: %s %s, %s converted to RGB",
          what,
          reporting.counted(bad, "bad image"),
          "replaced" if self._split == "train" else "masked out",
          reporting.counted(converted, "image"),
      )
      self._epoch_start = (self._bad, self._converted)
    return batch

  def stats(self) -> dict:
    """Bad (replaced / masked out) and converted image counts since the loader started."""
    return {"bad": self._bad, "converted": self._converted}

  def get_state(self):
    return {
        "step": self._step,
        "bad": self._bad,
        "converted": self._converted,
        "epoch_start": list(self._epoch_start),
    }

  def set_state(self, state):
    self._close_pipeline()
    self._step, self._bad, self._converted = state["step"], state["bad"], state["converted"]
    self._epoch_start = tuple(state["epoch_start"])

  def _close_pipeline(self):
    if self._iterator is not None:
      self._iterator.close()  # its worker processes end here
      self._iterator = None
      if self._workers:
        _free_shared_memory()
    if self._spawn_held:
      _release_spawn()
      self._spawn_held = False

  def close(self):
    self._close_pipeline()
    super().close()


def _num_workers(data_config) -> int:
  if data_config.num_workers != -1:
    return data_config.num_workers
  # -1: one per CPU this process may run on (a Slurm or container limit), not per core of the host
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def data_location(data_config) -> str:
  """Where a (classification or segmentation) data config's records live, for messages;
  `data_config` a ConfigDict or the data section of a run's config.json."""
  source = data_config.get("source")
  if source == "tfds":
    where = data_config.get("tfds_data_dir") or "default"
    return f"TFDS {data_config.get('tfds_name')} (data_dir {where})"
  return data_config.get("root") or f"the {source} data"


def _prefetch(ds, data_config, workers: int):
  """`ds` run in `workers` worker processes (grain mp_prefetch); as is for 0 workers."""
  if workers == 0:
    return ds
  _mark_flags_parsed()  # grain's worker code reads its absl flags
  return ds.mp_prefetch(
      grain.MultiprocessingOptions(
          num_workers=workers, per_worker_buffer_size=data_config.prefetch_buffer_size
      ),
      worker_init_fn=_init_worker,
  )


@functools.cache
def _free_shared_memory_at_exit() -> None:
  atexit.register(_free_shared_memory)


def _unlink_now(batch: dict) -> None:
  """Unlinks the shared memory of a batch that workers handed over as soon as it arrives. Its
  arrays stay readable (removing a name leaves the mappings valid) and unmap it when freed.
  grain unlinks when the arrays are freed (SharedMemoryArray's unlink-on-del), and the last
  batches of a pass are freed late: grain's prefetch threads keep them in reference cycles. A
  garbage collection and a wait for grain's unlink queue at close and at exit did not cover
  every case: under load, 3 of about 60 runs of two val passes still ended with one array's
  memory never unlinked, and Python's resource_tracker warned at exit of "leaked
  shared_memory objects" (google/grain#398 is the same warning)."""
  for leaf in batch.values():
    if isinstance(leaf, SharedMemoryArray) and leaf._unlink_on_del:
      leaf.shm.unlink()
      leaf._unlink_on_del = False  # its __del__ now only unmaps


def _free_shared_memory() -> None:
  """Unlinks the batches that workers put in shared memory and that were never handed out (a
  pass closed early leaves some); also runs at exit once a loader with workers has run. They sit
  in reference cycles (an exception's traceback holds the grain prefetch frame that holds one),
  which only the cyclic collector frees, and grain unlinks a freed batch in a thread pool
  (SharedMemoryArray.enable_async_del) that multiprocessing's exit handler terminates with its
  queue unrun. A pass closed after one batch left 10 arrays to Python's resource_tracker."""
  gc.collect()
  pool = getattr(SharedMemoryArray, "_del_thread_pool", None)  # grain's, one thread: FIFO
  if pool is not None:
    pool.apply(int)  # returns when the unlinks queued before it have run


# While a loader with workers is open (reference-counted: train and val loaders overlap),
# multiprocessing's spawn, which grain hardcodes, starts its workers in two ways of our own:
# 1. Through a launcher instead of Python. SIGINT/SIGTERM reach the whole process group (Ctrl-C,
#    `timeout`, Slurm), and a worker still starting up died of them: the evaluation failed, or
#    hung, since multiprocessing's Popen blocks writing the pickled dataset to a child that is
#    gone. The launcher sets both to ignored, which exec keeps (Python too, for SIGINT), so a
#    worker is immune from the launcher's second line on, about a millisecond after the fork;
#    _init_worker ignores them again where no launcher could be written.
# 2. Without running the main script again. spawn runs it (as __mp_main__) in each child so that
#    what it defines unpickles there; grain sends its workers everything cloudpickled, which
#    carries a script's own functions and classes by value, so they need none of it. A script
#    that trained or evaluated at its top level (no `if __name__ == "__main__":`) had every worker
#    train or evaluate in turn, until starting workers of its own failed: training stopped with
#    grain's "Worker process was terminated unexpectedly" and an evaluation hung, as in 1. Only
#    grain's workers (by the name grain gives them) start so: another process the program spawns
#    meanwhile is sent its target by plain pickle and may need the script (a function the script
#    defines failed to unpickle in it: AttributeError).
_spawn_lock = threading.Lock()
_spawn = {"users": 0, "saved": None, "launcher": None}


def _hold_spawn() -> None:
  """Makes spawn start Python through the launcher (written once per process, in the temp
  directory; not where it cannot run, e.g. a temp directory mounted noexec), and grain's workers
  without the main script; _release_spawn() restores spawn once no loader holds it."""
  with _spawn_lock:
    if _spawn["launcher"] is None:
      _spawn["launcher"] = _write_launcher(mp_spawn.get_executable()) or ""
    if _spawn["users"] == 0:
      _spawn["saved"] = (mp_spawn.get_executable(), mp_spawn.get_preparation_data)
      if _spawn["launcher"]:
        mp_spawn.set_executable(_spawn["launcher"])
      mp_spawn.get_preparation_data = _preparation_data_without_main
    _spawn["users"] += 1


def _release_spawn() -> None:
  with _spawn_lock:
    _spawn["users"] -= 1
    if _spawn["users"] == 0:
      executable, mp_spawn.get_preparation_data = _spawn["saved"]
      mp_spawn.set_executable(executable)


# grain's ProcessPrefetchDatasetIterator names each worker process so (multiprocessing passes
# the process's name to get_preparation_data).
_GRAIN_WORKER_NAME = "grain-process-prefetch-"


def _preparation_data_without_main(name: str) -> dict:
  """What spawn sends a new process to prepare it: for a grain worker without the main module
  to run (2. above); for any other process as spawn has it."""
  data = _spawn["saved"][1](name)
  if name.startswith(_GRAIN_WORKER_NAME):
    data.pop("init_main_from_path", None)
    data.pop("init_main_from_name", None)
  return data


def _write_launcher(python) -> str | None:
  """The path of a /bin/sh script that runs `python` (str or bytes, as spawn keeps it) with
  SIGINT and SIGTERM ignored, or None (with a warning) where it does not run."""
  path = os.path.join(tempfile.mkdtemp(prefix="fec-jax-"), "python")
  with open(path, "w") as f:
    f.write(f"#!/bin/sh\ntrap '' INT TERM\nexec {shlex.quote(os.fsdecode(python))} \"$@\"\n")
  os.chmod(path, 0o700)
  atexit.register(shutil.rmtree, os.path.dirname(path), ignore_errors=True)
  try:
    subprocess.run([path, "-c", ""], check=True, timeout=60, capture_output=True)
  except (OSError, subprocess.SubprocessError) as e:
    log.warning(
        "loader workers start without the signal launcher (%s): a SIGINT or SIGTERM to the "
        "process group while they start can end them",
        e,
    )
    return None
  return path


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Runs first in each worker process. SIGINT/SIGTERM (Ctrl-C, a scheduler) reach the whole
  process group but are the main process's to handle (fec_jax.preemption finishes the step and
  saves a checkpoint, then the loader's close() ends the workers), so workers ignore them (from
  their start, with the launcher above); and since no signal ends them now, they end with the
  main process if it exits without close() (a second signal's os._exit, a crash), which grain's
  workers do not do by themselves."""
  del worker_index, worker_count
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
  threading.Thread(target=_exit_with_main_process, daemon=True).start()
  _log_as_absl()


def _log_as_absl() -> None:
  """A worker's log lines (bad files) in the main process's format, absl's: the root logger
  has only absl's handler (a worker's Python logging printed 'WARNING:fec_jax...'), with absl's
  formatter instead of grain's '[worker] message'."""
  _mark_flags_parsed()  # else absl notes "Logging before flag parsing"
  handler = absl_logging.get_absl_handler()
  handler.setFormatter(absl_logging.PythonFormatter())
  logging.getLogger().handlers = [handler]


def _mark_flags_parsed() -> None:
  """absl's flags as parsed where no absl.app parsed them (a script, a notebook, a worker)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _exit_with_main_process() -> None:
  multiprocessing.parent_process().join()  # returns when the main process has ended
  os._exit(1)
