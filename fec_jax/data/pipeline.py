"""The grain classification pipeline: deterministic, resumable, sharded per host, multi-process.

Decoding, the train and eval transforms and the batches of one host's shard of a split. The
train and val orders, the replacement of bad files and the worker processes are
fec_jax.data.loader's (its module doc), which the segmentation pipeline shares. Every example's
augmentation draws from its own generator seeded with (seed, epoch, global position). Val pads
with masked examples (mask False, image 0, label 0) to a whole number of global batches.

Bad input (unreadable, truncated, corrupt files) is replaced in train and masked out in val
(fec_jax.data.loader). Odd modes (grayscale, CMYK, RGBA, palette, 16-bit) are converted to RGB.
Both are counted; the counts are logged once per epoch and kept in the iterator state (`stats()`
returns them).
"""

import grain
import numpy as np

from fec_jax.data import config as config_lib
from fec_jax.data import loader, sources, transforms


def num_examples(data_config, split: str) -> int:
  """Number of records of a split ('train' | 'val'), bad files included."""
  config_lib.validate(data_config)
  return len(sources.make_source(data_config, split))


def steps_per_epoch(data_config, global_batch_size: int, shard_count: int = 1) -> int:
  """Train batches per epoch per host: (N // shard_count) // local_batch."""
  local_batch = loader.local_batch(global_batch_size, shard_count)
  return loader.epoch_steps(num_examples(data_config, "train"), local_batch, shard_count)


def num_eval_batches(data_config, global_batch_size: int) -> int:
  """Val batches per host: ceil(N / global_batch_size); padding is masked."""
  return loader.val_steps(num_examples(data_config, "val"), global_batch_size, 1)


def _decode(record) -> tuple[np.ndarray, bool]:
  """(uint8 [H, W, 3] RGB image, converted) of a source record; transforms.decode."""
  return transforms.decode(record["encoded"])


class _MakeExample:
  """(record index, epoch, position) -> {'image' uint8 [S, S, 3], 'label' int32, 'mask' bool,
  'num_bad' int32, 'num_converted' int32, train: 'erase' int32 [4]}; a bad file is replaced
  (train) or masked out (val), see loader.Reader."""

  def __init__(self, source, cfg, seed: int, train: bool):
    self._cfg, self._seed, self._train = cfg, seed, train
    self._read = loader.Reader(source, _decode, train, loader.data_location(cfg))
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
    record, decoded, bad = self._read(index)
    out["num_bad"] = np.int32(bad)
    if decoded is None:
      return out
    image, converted = decoded
    if self._train:
      rng = np.random.default_rng([self._seed % 2**63, epoch, position])
      out["image"], out["erase"] = transforms.train_transform(rng, image, self._cfg, *self._ra)
    else:
      out["image"] = transforms.eval_transform(image, self._cfg)
    out.update(label=np.int32(record["label"]), mask=True, num_converted=np.int32(converted))
    return out


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
    steps_per_epoch()), else that many epochs.
  val ('val'): source order, eval transform, one pass of num_eval_batches() batches,
    padding masked (`num_epochs` is ignored).
  Mixup/CutMix, normalization and the erasing fill run on device (mixup, device_transforms;
  fec_jax.tasks.classification.per_device_augment applies them in the official training's order).

  Checkpointing: the iterator's state (get_state()/set_state(), a JSON-able dict) goes
  into Orbax with grain.checkpoint.CheckpointSave(it) / CheckpointRestore(it). Resuming
  requires the same config, seed, batch size and shards; the number of worker processes may
  differ. Per-epoch counts of bad and converted images are logged; `it.stats()` has them.
  Call `it.close()` when done: it ends the iterator's worker processes. They ignore SIGINT and
  SIGTERM (the caller handles them, see loader._init_worker) and end if the calling process does.
  """
  config_lib.validate(data_config)
  loader.check_split(split, shard_index, shard_count)
  local_batch = loader.local_batch(global_batch_size, shard_count)
  source = sources.make_source(data_config, split)
  n = len(source)
  train = split == "train"
  if train:
    order, steps, total = loader.train_order(
        n, local_batch, shard_index, shard_count, seed, num_epochs
    )
  else:
    order, steps, total = loader.val_order(n, local_batch, shard_index, shard_count)
  examples = grain.MapDataset.range(total).map(order)
  batches = examples.map(_MakeExample(source, data_config, seed, train)).batch(local_batch)
  return loader.Loader(batches, data_config, steps, split)
