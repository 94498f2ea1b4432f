"""The grain segmentation pipeline: deterministic, resumable, sharded per host.

Train order, per-example random draws, batching, bad-file handling and the per-epoch counts
are fec_jax.data.loader's, which the classification pipeline (fec_jax.data.pipeline) shares:
each epoch permutes the records from (seed, epoch), host h of H takes global positions h, h + H,
..., every example draws from its own generator seeded with (seed, epoch, position), and batches
are made before the worker processes, so a batch does not depend on the number of worker
processes or threads, nor on where a run was resumed.

Val: one example at a time (images differ in size). Host h of H takes the records at
positions h, h + H, ...; the last, uneven share is padded: every host yields
ceil(N / H) examples, and the padding (like a bad file) has mask False and a label of
ignore_index only, so it adds nothing to the metric's sums even if it is not skipped.

Bad input (unreadable or corrupt image or annotation, an annotation that is not 8-bit
single-channel or not the image's size, an image too thin for the resize): in train the next
readable record in source order takes its place, val keeps its slot with mask False; odd image
modes (grayscale, CMYK, ...) are converted to RGB. Both are counted and logged once per epoch;
`it.stats()` returns the counts. A train annotation with a class id outside [0, num_classes)
(other than ignore_index) is a config that does not fit the data: an error, not a replaced
example.
"""

import functools

import grain
import numpy as np

from fec_jax.data import loader, seg_sources, seg_transforms, sources, transforms
from fec_jax.data import seg_config as config_lib


def seg_num_examples(data_config, split: str) -> int:
  """Number of records of a split ('train' | 'val'), bad files included."""
  config_lib.validate(data_config)
  return len(seg_sources.make_seg_source(data_config, split))


def seg_steps_per_epoch(data_config, global_batch_size: int, shard_count: int = 1) -> int:
  """Train batches per epoch per host: (N // shard_count) // local_batch."""
  local_batch = loader.local_batch(global_batch_size, shard_count)
  return loader.epoch_steps(seg_num_examples(data_config, "train"), local_batch, shard_count)


def seg_num_eval_examples(data_config, shard_count: int = 1) -> int:
  """Val examples per host (padding included): ceil(N / shard_count)."""
  return loader.val_steps(seg_num_examples(data_config, "val"), 1, shard_count)


def seg_check_val(data_config, count: int) -> tuple[list[np.ndarray], list[str], int]:
  """The first `count` val records (or all, where there are fewer) decoded as the evaluation
  decodes them (_decode), for a training run's check at its start; where none of them decodes,
  the records after them up to the first that does (none: the whole split, which the evaluation
  would find nothing in). (the labels of those that decode, uint8 [H0, W0] each with
  reduce_zero_label applied; 'key: why' for each that does not, as the loader's bad-file warning
  names it; the records of the split)."""
  config_lib.validate(data_config)
  source = seg_sources.make_seg_source(data_config, "val")
  labels, bad = [], []
  for index in range(len(source)):
    if index >= count and labels:
      break
    record = source[index]
    try:
      labels.append(_decode(record, data_config)[1])
    except transforms.BadImageError as e:
      bad.append(f"{sources.one_line(record['key'])}: {e}")
  return labels, bad, len(source)


def _decode(record, cfg, train: bool = False):
  """(uint8 [H, W, 3] image, uint8 [H, W] label with reduce_zero_label applied, converted);
  raises transforms.BadImageError for any bad file, mismatched sizes or an image too thin for the
  resize (`train`: its smallest draw; else the test resize). JPEGs decode to the
  pixels of mmseg's cv2.imdecode (tests/test_seg_data.py checks this), which also turns an image
  by its EXIF orientation; the annotation is read as stored (LoadAnnotations' Pillow)."""
  image, converted = transforms.decode(record["image"])
  stored = image.shape
  if isinstance(record["image"], bytes):
    image = transforms.upright(image, record["image"])
  label_key = sources.one_line(record["label_key"])  # the bad-file warning is one line
  try:
    label = seg_transforms.decode_label(record["label"])
  except transforms.BadImageError as e:  # the warning names the image: say which file failed
    raise transforms.BadImageError(f"annotation {label_key}: {e}") from e
  if label.shape != image.shape[:2]:
    turned = " turned upright by its EXIF orientation" if image.shape != stored else ""
    raise transforms.BadImageError(
        f"annotation {label_key} is {label.shape[1]}x{label.shape[0]}, image "
        f"{image.shape[1]}x{image.shape[0]}{turned}"
    )
  if train:  # a drawn scale is at least this one
    scale = seg_transforms.smallest_scale(cfg)
    seg_transforms.check_rescale(
        *image.shape[:2],
        scale,
        f"{scale}, train's smallest (img_scale {tuple(cfg.img_scale)} times ratio_range's "
        f"low end {cfg.ratio_range[0]})",
    )
  else:
    seg_transforms.check_rescale(*image.shape[:2], cfg.img_scale)
  if cfg.reduce_zero_label:
    label = seg_transforms.reduce_zero_label(label)
  return image, label, converted


def _check_label_range(label, cfg, label_key) -> None:
  """ValueError for a class id >= num_classes that is not ignore_index in a train annotation:
  the loss would be NaN (PyTorch's cross_entropy, which the official code trains with, raises
  "Target 4 is out of bounds"). Val labels only get a warning (the segmentation evaluator's):
  mmseg's metric leaves them out. The message gives the ids as the file holds them."""
  stored = seg_transforms.unknown_ids(label, cfg)
  if stored:
    raise ValueError(
        f"the annotation {sources.one_line(label_key)} holds class ids {stored}; expected "
        f"{seg_transforms.expected_ids(cfg)}: config.data.num_classes (or reduce_zero_label) "
        "does not fit the data"
    )


class MakeExample:
  """(record index or -1, epoch, position) -> an example; a bad file is replaced (train) or
  masked out (val), see loader.Reader.

  train: {'image' uint8 [ch, cw, 3], 'label' uint8 [ch, cw], 'valid' int32 [2]};
  val: {'image' uint8 [h, w, 3], 'label' uint8 [H0, W0]}; both also 'mask' bool,
  'num_bad' int32, 'num_converted' int32."""

  def __init__(self, source, cfg, seed: int, train: bool):
    self._cfg, self._seed, self._train = cfg, seed, train
    decode = functools.partial(_decode, cfg=cfg, train=train)
    self._read = loader.Reader(
        source,
        decode,
        train,
        loader.data_location(cfg),
        "images and annotations",
        "record (image and annotation)",
    )

  def _empty(self) -> dict:
    """Image 0 and label ignore_index, for padding and bad files."""
    cfg = self._cfg
    h, w = cfg.crop_size if self._train else (cfg.size_divisor, cfg.size_divisor)
    out = {
        "image": np.zeros((h, w, 3), np.uint8),
        "label": np.full((h, w), cfg.ignore_index, np.uint8),
    }
    if self._train:
      out["valid"] = np.zeros(2, np.int32)
    return out

  def __call__(self, item) -> dict:
    index, epoch, position = item
    out = {"mask": False, "num_bad": np.int32(0), "num_converted": np.int32(0)}
    if index < 0:
      return {**self._empty(), **out}
    record, decoded, bad = self._read(index)
    out["num_bad"] = np.int32(bad)
    if decoded is None:
      return {**self._empty(), **out}
    image, label, converted = decoded
    if self._train:
      _check_label_range(label, self._cfg, record["label_key"])
      rng = np.random.default_rng([self._seed % 2**63, epoch, position])
      out["image"], out["label"], out["valid"] = seg_transforms.train_transform(
          rng, image, label, self._cfg
      )
    else:
      out["image"], out["label"] = seg_transforms.eval_transform(image, self._cfg), label
    out.update(mask=True, num_converted=np.int32(converted))
    return out


def create_seg_loader(
    data_config,
    split: str,
    global_batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs=None,
):
  """A grain DatasetIterator over one host's shard of a segmentation split.

  train ('train'): batches of local_batch = global_batch_size // shard_count:
    'image': uint8 [local_batch, ch, cw, 3] NHWC, (ch, cw) = crop_size, zero padded at the
             bottom and right; normalize on device with seg_device_transforms.normalize;
    'label': uint8 [local_batch, ch, cw], class indices, ignore_index (255) = ignore,
             padding included;
    'valid': int32 [local_batch, 2], the unpadded (height, width) of each image.
    Shuffled per epoch from `seed`, remainder dropped per epoch; `num_epochs` None =
    endless (count steps with seg_steps_per_epoch()), else that many epochs.
  val ('val'): single examples (global_batch_size is not used), seg_num_eval_examples() of
    them, in source order on this host's share (see the module doc):
    'image': uint8 [h, w, 3], the test resize (sides multiples of size_divisor);
    'label': uint8 [H0, W0], the annotation at its original size (reduced, 255 = ignore);
    'mask':  bool, False for padding and bad files.
  Checkpointing, resuming, worker processes, `stats()` and `close()` are as for
  fec_jax.data.create_loader (same config, seed, batch size and shards; any num_workers).
  """
  config_lib.validate(data_config)
  loader.check_split(split, shard_index, shard_count)
  source = seg_sources.make_seg_source(data_config, split)
  n = len(source)
  train = split == "train"
  if train:
    local_batch = loader.local_batch(global_batch_size, shard_count)
    order, steps, total = loader.train_order(
        n, local_batch, shard_index, shard_count, seed, num_epochs
    )
  else:  # single examples: a local batch of 1, not batched below
    order, steps, total = loader.val_order(n, 1, shard_index, shard_count)
  elements = grain.MapDataset.range(total).map(order)
  elements = elements.map(MakeExample(source, data_config, seed, train))
  if train:
    elements = elements.batch(local_batch)
  return iter(loader.Loader(elements, data_config, steps, split))
