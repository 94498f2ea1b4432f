"""The grain input pipeline: deterministic, resumable, sharded per host, multi-process.

Train order (like torch's DistributedSampler, which the official script uses): each
epoch e draws a global permutation of the N records from (seed, e); host h of H takes
positions h, h + H, h + 2H, ... and the per-host epoch is cut to a whole number of
local batches (drop remainder). Every example's augmentation draws from its own
generator seeded with (seed, e, global position), so it does not depend on the number of
hosts, worker processes or threads, nor on where a run was resumed. With W > 1 worker
processes each worker batches its own slice of the order, so the examples are grouped into
batches differently than with W = 0 or 1.

Val order: the records in source order, position p on host p % H, padded with masked
examples (mask False, image 0, label 0) to a whole number of global batches, so every
host runs the same number of eval steps and each real example is counted exactly once.

Bad input (unreadable, truncated, corrupt files): train skips the example (the batch is
filled with the next ones; labels travel with their images, never shift) and raises
DataNotFoundError after as many bad examples in a row as the split has records; val keeps
its slot with mask False. Odd modes (grayscale, CMYK, RGBA, palette, 16-bit) are converted
to RGB. Both are counted; the counts are logged once per epoch and kept in the iterator
state (`stats()` returns them).
"""

import logging
import multiprocessing
import os
import signal
import sys
import threading

import grain
from absl import flags
import numpy as np

from fec_jax.data import config as config_lib
from fec_jax.data import sources, transforms

log = logging.getLogger(__name__)


def num_examples(data_config, split: str) -> int:
  """Number of records of a split ('train' | 'val'), bad files included."""
  config_lib.validate(data_config)
  return len(sources.make_source(data_config, split))


def steps_per_epoch(data_config, global_batch_size: int, shard_count: int = 1) -> int:
  """Train batches per epoch per host: (N // shard_count) // local_batch."""
  local_batch = _local_batch(global_batch_size, shard_count)
  return (num_examples(data_config, "train") // shard_count) // local_batch


def num_eval_batches(data_config, global_batch_size: int) -> int:
  """Val batches per host: ceil(N / global_batch_size), rounded up to a multiple of the val
  worker processes (see _val_layout); padding is masked."""
  return _val_layout(data_config, num_examples(data_config, "val"), global_batch_size)[0]


def _val_layout(data_config, n: int, global_batch_size: int) -> tuple[int, int]:
  """(val batches per host, worker processes) for n val records. Each worker batches its own
  slice, so the batches are a multiple of the workers, and every all-padding batch of that
  rounding still runs through the model. Each worker makes `rounds` batches, as few as the
  configured workers allow; then as few workers as make the batches in that many rounds, which
  leaves fewer than `rounds` padding batches (ImageNet's 50,000 at 1024 on 16 workers: 49
  batches of images, 52 = 4 x 13 in all, where 16 workers would run 64)."""
  batches = -(-n // global_batch_size)
  most = _num_workers(data_config)
  if most == 0:
    return batches, 0
  rounds = -(-batches // most)
  workers = -(-batches // rounds)
  return rounds * workers, workers


def _num_workers(data_config) -> int:
  return os.cpu_count() if data_config.num_workers == -1 else data_config.num_workers


def _local_batch(global_batch_size: int, shard_count: int) -> int:
  if global_batch_size % shard_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {shard_count} shards")
  return global_batch_size // shard_count


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


class _ValOrder:
  """Host-local val index j -> (record index or -1 for padding, 0, global position)."""

  def __init__(self, num_records, shard_index, shard_count):
    self._n, self._shard_index, self._shard_count = num_records, shard_index, shard_count

  def __call__(self, j: int):
    position = j * self._shard_count + self._shard_index
    return (position if position < self._n else -1), 0, position


class _MakeExample:
  """(record index, epoch, position) -> {'image' uint8 [S, S, 3], 'label' int32, 'mask' bool,
  'num_bad' int32, 'num_converted' int32, train: 'erase' int32 [4]}; never raises on bad
  images."""

  def __init__(self, source, cfg, seed: int, train: bool):
    self._source, self._cfg, self._seed, self._train = source, cfg, seed, train
    self._ra = transforms.randaugment_setup(cfg) if train else (None, None)

  def __call__(self, item) -> dict:
    index, epoch, position = item
    size = self._cfg.image_size
    out = {
        "image": np.zeros((size, size, 3), np.uint8),
        "label": np.int32(0),
        "mask": False,
        "num_bad": np.int32(0),
        "num_converted": np.int32(0),
    }
    if self._train:
      out["erase"] = transforms.NO_ERASE
    if index < 0:
      return out
    record = self._source[index]
    try:
      image, converted = transforms.decode(record["encoded"])
    except transforms.BadImageError as e:
      what = "skipped (train)" if self._train else "masked out (val)"
      log.warning("bad image %s %s: %s", record["key"], what, e)
      out["num_bad"] = np.int32(1)
      return out
    if self._train:
      rng = np.random.default_rng([self._seed % 2**63, epoch, position])
      out["image"], out["erase"] = transforms.train_transform(rng, image, self._cfg, *self._ra)
    else:
      out["image"] = transforms.eval_transform(image, self._cfg)
    out.update(label=np.int32(record["label"]), mask=True, num_converted=np.int32(converted))
    return out


class _SkipBad(grain.IterDataset):
  """Drops examples whose image failed to decode; their count rides on the next example.
  `limit` bad examples in a row (the number of records: an epoch's worth) raise
  DataNotFoundError naming `where`, since an endless stream would skip them forever."""

  def __init__(self, parent, limit: int, where: str):
    super().__init__(parent)
    self._limit, self._where = limit, where

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__(), self._limit, self._where)


class _SkipBadIterator(grain.DatasetIterator):

  def __init__(self, parent, limit: int, where: str):
    super().__init__(parent)
    self._limit, self._where = limit, where

  def __next__(self):
    num_bad = 0
    while True:
      example = next(self._parent)
      if example["mask"]:
        example["num_bad"] = np.int32(example["num_bad"] + num_bad)
        return example
      num_bad += int(example["num_bad"])
      if num_bad >= self._limit:
        raise sources.DataNotFoundError(
            f"no readable image in {num_bad} consecutive train examples of {self._where}; "
            "expected image files that decode (the warnings above name the bad ones)"
        )

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _Report(grain.IterDataset):
  """Removes the bad/converted counts from the batches and logs them once per epoch; its state
  holds the number of worker processes, which a restore must match."""

  def __init__(self, parent, steps_per_epoch: int, split: str, workers: int):
    super().__init__(parent)
    self._steps_per_epoch, self._split, self._workers = steps_per_epoch, split, workers

  def __iter__(self):
    return _ReportIterator(
        self._parent.__iter__(), self._steps_per_epoch, self._split, self._workers
    )


class _ReportIterator(grain.DatasetIterator):

  def __init__(self, parent, steps_per_epoch: int, split: str, workers: int):
    super().__init__(parent)
    self._steps_per_epoch, self._split, self._workers = steps_per_epoch, split, workers
    self._step, self._bad, self._converted = 0, 0, 0
    self._epoch_start = (0, 0)

  def __next__(self):
    batch = dict(next(self._parent))
    self._bad += int(batch.pop("num_bad").sum())
    self._converted += int(batch.pop("num_converted").sum())
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
          "%s: %d bad images %s, %d images converted to RGB",
          what,
          bad,
          "skipped" if self._split == "train" else "masked out",
          converted,
      )
      self._epoch_start = (self._bad, self._converted)
    return batch

  def stats(self) -> dict:
    """Bad (skipped / masked out) and converted image counts since the loader started."""
    return {"bad": self._bad, "converted": self._converted}

  def get_state(self):
    return {
        "parent": self._parent.get_state(),
        "step": self._step,
        "bad": self._bad,
        "converted": self._converted,
        "epoch_start": list(self._epoch_start),
        "workers": self._workers,
    }

  def set_state(self, state):
    # grain's state is per worker: another count fails in grain or, worse, reads another order
    saved = state.get("workers", self._workers)  # unchecked for a state of an earlier fec-jax
    if saved != self._workers:
      raise ValueError(
          f"the checkpoint's {self._split} data iterator was saved with {saved} loader worker "
          f"processes per host and this run has {self._workers} (config.data.num_workers; -1 = "
          f"one per core): the saved position is per worker, so resume with "
          f"--config.data.num_workers={saved}"
      )
    self._parent.set_state(state["parent"])
    self._step, self._bad, self._converted = state["step"], state["bad"], state["converted"]
    self._epoch_start = tuple(state["epoch_start"])


def create_loader(*args, **kwargs):
  """A grain DatasetIterator over batches of one host's shard of a split:
  `iter(create_dataset(...))`, same arguments."""
  return iter(create_dataset(*args, **kwargs))


def create_dataset(
    data_config,
    split: str,
    global_batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs=None,
):
  """A grain IterDataset over batches of one host's shard of a split; each `iter()` of it is a
  fresh pass (its own worker processes, ended by the iterator's close()). The source is listed
  once, here, so an evaluator that iterates it at every evaluation lists the files once.

  Yields dicts of numpy arrays, local_batch = global_batch_size // shard_count:
    'image': uint8 [local_batch, S, S, 3] NHWC (S = image_size), normalized on device
             (device_transforms.normalize);
    'label': int32 [local_batch];
    'erase': int32 [local_batch, 4], train only: random erasing boxes (top, left, h, w),
             filled on device (device_transforms.erase); zero size = none;
    'mask':  bool [local_batch], val only: False for padding and bad images.
  train ('train'): shuffled per epoch from `seed`, drop remainder per epoch, the full
    train transform; `num_epochs` None = endless (recommended: count steps with
    steps_per_epoch()), else that many epochs (with W > 1 worker processes each worker
    drops its own remainder at the very end, so up to W - 1 batches fewer).
  val ('val'): source order, eval transform, one pass of num_eval_batches() batches,
    padding masked (`num_epochs` is ignored).
  Normalization, the erasing fill and Mixup/CutMix run on device (device_transforms, mixup;
  fec_jax.tasks.classification.per_device_augment applies them in timm's order).

  Checkpointing: the iterator's state (get_state()/set_state(), a JSON-able dict) goes
  into Orbax with grain.checkpoint.CheckpointSave(it) / CheckpointRestore(it). Resuming
  requires the same config, seed, batch size, shards and number of workers (set_state raises
  ValueError for another number of workers).
  Per-epoch counts of bad and converted images are logged; `it.stats()` has them.
  Call `it.close()` when done: it ends the iterator's worker processes. They ignore SIGINT and
  SIGTERM (the caller handles them, see _init_worker) and end if the calling process does.
  """
  config_lib.validate(data_config)
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  local_batch = _local_batch(global_batch_size, shard_count)
  source = sources.make_source(data_config, split)
  n = len(source)
  train = split == "train"
  if train:
    per_host_epoch = (n // shard_count) // local_batch * local_batch
    if per_host_epoch == 0:
      raise ValueError(f"{n} train examples are fewer than one global batch ({global_batch_size})")
    total = per_host_epoch * num_epochs if num_epochs else sys.maxsize
    order = _TrainOrder(n, per_host_epoch, shard_index, shard_count, seed)
    steps = per_host_epoch // local_batch
    workers = _num_workers(data_config)
  else:
    steps, workers = _val_layout(data_config, n, global_batch_size)
    total = steps * local_batch
    order = _ValOrder(n, shard_index, shard_count)
  ds = grain.MapDataset.range(total).map(order).map(_MakeExample(source, data_config, seed, train))
  ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=data_config.read_threads, prefetch_buffer_size=2 * local_batch)
  )
  if train:
    ds = _SkipBad(ds, n, data_location(data_config))
  ds = ds.batch(local_batch, drop_remainder=train)
  return _Report(_prefetch(ds, data_config, workers), steps, split, workers)


def data_location(data_config) -> str:
  """Where a (classification or segmentation) data config's records live, for messages."""
  if data_config.source == "tfds":
    return f"TFDS {data_config.tfds_name} (data_dir {data_config.tfds_data_dir or 'default'})"
  return data_config.root or f"the {data_config.source} data"


def _prefetch(ds, data_config, workers: int):
  """`ds` run in `workers` worker processes (grain mp_prefetch); as is for 0 workers."""
  if workers == 0:
    return ds
  if not flags.FLAGS.is_parsed():  # grain's worker code reads its absl flags
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(
      grain.MultiprocessingOptions(
          num_workers=workers, per_worker_buffer_size=data_config.prefetch_buffer_size
      ),
      worker_init_fn=_init_worker,
  )


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Runs first in each worker process. SIGINT/SIGTERM (Ctrl-C, a scheduler) reach the whole
  process group but are the main process's to handle (fec_jax.preemption finishes the step and
  saves a checkpoint, then the loader's close() ends the workers), so workers ignore them; and
  since no signal ends them now, they end with the main process if it exits without close()
  (a second signal's os._exit, a crash), which grain's workers do not do by themselves."""
  del worker_index, worker_count
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
  threading.Thread(target=_exit_with_main_process, daemon=True).start()


def _exit_with_main_process() -> None:
  multiprocessing.parent_process().join()  # returns when the main process has ended
  os._exit(1)
