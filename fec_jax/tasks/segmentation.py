"""Semantic segmentation with the authors' ADE20K recipe (Semantic FPN on an FEC backbone,
mmsegmentation 0.24): the mmseg train pipeline on the host (fec_jax.data), normalization on the
device, per-pixel cross-entropy at the label's size; evaluation by mIoU / mAcc / aAcc with
whole-image inference at each image's own size (docs/official-code.md Sec. 10)."""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fec_jax import checkpoint, data, fpn, miou, reporting
from fec_jax.data import classes, seg_device_transforms, seg_transforms
from fec_jax.model import SEGMENTERS, init_from_models, model_name
from fec_jax.tasks import Evaluator, Progress, Task

CONV_SEG = ("decode_head/conv_seg/kernel", "decode_head/conv_seg/bias")  # the classifier
# What mmseg's Pretrained init of the backbone leaves out of an ImageNet classifier checkpoint:
# the classifier head and its final norm (the seg backbone has none; docs/official-code.md
# Sec. 6). The backbone's output norms norm0/2/4/6 are in a dense backbone's checkpoint
# (fec_*_seg / fec_*_det), not in a classifier's.
CLASSIFIER_ONLY = ("head", "norm")
OUTPUT_NORMS = ("norm0", "norm2", "norm4", "norm6")
VAL_CHECKED = 8  # the val records a training run reads at its start (Segmentation.check_eval_data)


def cross_entropy(logits, labels, ignore_index: int):
  """mmseg 0.24's decode-head loss: `resize(seg_logit, size=label size, mode='bilinear',
  align_corners=False)`, then CrossEntropyLoss(ignore_index) (255 in the configs) with its default
  avg_non_ignore=False: the per-pixel losses (0 at ignored pixels) averaged over ALL label
  pixels, ignored ones included (weight_reduce_loss(reduction='mean')). The same mean over the
  global batch as the official per-GPU means averaged by DDP (every GPU has as many pixels).

  logits [B, h, w, K] (stride 4), labels int [B, H, W] -> fp32 scalar."""
  logits = fpn.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])  # [B, H, W, K]
  valid = labels != ignore_index  # [B, H, W]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  return jnp.sum(jnp.where(valid, losses, 0.0)) / labels.size


def predict_labels(model, variables, image, out_hw: tuple[int, int], data_config):
  """uint8 [1, h, w, 3] at the test size -> int32 [1, *out_hw], each pixel's class: the
  normalization of data_config (mean, std), then whole-image inference (fpn.predict)."""
  valid = jnp.array([image.shape[1:3]], jnp.int32)  # [1, 2]: nothing is padded
  x = seg_device_transforms.normalize(image, valid, data_config.mean, data_config.std)
  return fpn.predict(model, variables, x, out_hw)


class MeanIoU(Evaluator):
  """mIoU / mAcc / aAcc (%) over the val split as mmseg 0.24 computes them (fec_jax.miou):
  each image at its test size (keep-ratio resize, sides multiples of 32), whole-image inference
  (fpn.predict) to the annotation's original size, per-class areas summed in int64 on the host
  and over all hosts. Each host runs its share of the images on its first local device, one
  image at a time (the images differ in size); the prediction is compiled once per distinct
  (image size, annotation size)."""

  def __init__(self, model, config, compiler_options: dict | None = None):
    self._config, self._compiler_options = config, compiler_options
    self._num_classes = config.data.num_classes
    self._device = jax.local_devices()[0]

    def eval_step(variables, image, label):  # uint8 [1, h, w, 3], uint8 [H0, W0]
      pred = predict_labels(model, variables, image, label.shape, config.data)[0]  # [H0, W0]
      return miou.intersect_and_union(pred, label, self._num_classes, config.data.ignore_index)

    self._jitted = jax.jit(eval_step)
    self._steps = {}  # (image shape, label shape) -> compiled step
    self._num_examples = data.seg_num_eval_examples(config.data, jax.process_count())
    # The val annotations' warnings come with the first evaluation only: a training run
    # evaluates the same annotations again and again.
    self._warn = jax.process_index() == 0

  def _step(self, variables, image, label):
    key = (image.shape, label.shape)
    if key not in self._steps:
      self._steps[key] = self._jitted.lower(variables, image, label).compile(self._compiler_options)
    return self._steps[key](variables, image, label)

  def _local(self, variables):
    """The replicated variables' copy on this host's first device (numpy leaves are put there)."""
    return jax.tree.map(
        lambda a: (
            a.addressable_data(0) if isinstance(a, jax.Array) else jax.device_put(a, self._device)
        ),
        variables,
    )

  def evaluate(
      self,
      variable_sets: Sequence[dict],
      per_class: bool = False,
      stop: Callable[[], bool] | None = None,
      log: Callable[[str], None] = logging.info,
  ) -> list[dict[str, float]]:
    local_sets = [self._local(variables) for variables in variable_sets]
    totals = [
        {
            k: np.zeros(self._num_classes, np.int64)
            for k in ("area_intersect", "area_union", "area_pred", "area_label")
        }
        for _ in local_sets
    ]
    # [1] each: the images this host evaluated, and those whose annotation has an unknown id
    counts = {"images": np.zeros(1, np.int64), "unknown": np.zeros(1, np.int64)}
    unknown_ids = set()  # the unknown ids this host saw
    # (set index, device result) not yet fetched: the next image is dispatched meanwhile.
    pending = collections.deque()
    progress = Progress(self._num_examples, "image", stop, log)
    examples = data.create_seg_loader(
        self._config.data, "val", 1, self._config.seed, jax.process_index(), jax.process_count()
    )
    try:
      for done, example in enumerate(examples, 1):
        if example["mask"]:  # else padding of the last host's share, or a bad file
          counts["images"] += 1
          ids = seg_transforms.unknown_ids(example["label"], self._config.data)
          counts["unknown"] += bool(ids)
          unknown_ids.update(ids)
          image = jax.device_put(example["image"][None], self._device)
          label = jax.device_put(example["label"], self._device)
          for i, variables in enumerate(local_sets):
            pending.append((i, self._step(variables, image, label)))
          while len(pending) > 2 * len(local_sets):
            i, areas = pending.popleft()
            _add(totals[i], jax.device_get(areas))
        progress.update(done, f" ({reporting.counted(len(self._steps), 'size')} compiled)")
    finally:
      examples.close()  # its worker processes end here
    for i, areas in pending:
      _add(totals[i], jax.device_get(areas))
    counts = _sum_over_hosts(counts)
    count = int(counts["images"][0])
    if counts["unknown"][0] and self._warn:
      warn_unknown_ids(self._config.data, int(counts["unknown"][0]), count, unknown_ids)
    if not count:
      raise self.nothing_to_evaluate(self._config.data)
    totals = [_sum_over_hosts(t) for t in totals]
    if not totals[0]["area_label"].sum():  # mIoU would be NaN (mmseg's 0 / 0)
      d = self._config.data
      zero = " after reduce_zero_label (0 -> 255)" if d.reduce_zero_label else ""
      raise data.DataNotFoundError(
          f"no labelled pixel in the {reporting.counted(count, 'val image')} of "
          f"{data.data_location(d)}: every annotation pixel is ignore_index {d.ignore_index}"
          f"{zero} or a class id >= config.data.num_classes {d.num_classes}; nothing to score"
      )
    absent = np.flatnonzero(totals[0]["area_label"] == 0)
    if absent.size and self._warn:
      self._warn_absent(absent, count)
    self._warn = False
    return [{**miou.summarize(t, per_class), "images": count} for t in totals]

  def _warn_absent(self, absent: np.ndarray, count: int) -> None:
    """A warning that the classes `absent` have no labelled pixel in the `count` val images:
    their Acc is NaN, which mAcc leaves out (as mmseg's nanmean), and their IoU 0 where the model
    predicts them, else NaN and left out of mIoU, so the scores say little of them (e.g. a 0/255
    binary mask: the 255 foreground is ignore_index)."""
    names = classes.segmentation_names(self._config.data)
    shown = reporting.listed([repr(names[i]) for i in absent], 8)
    logging.warning(
        "%d of the %d classes %s no labelled pixel in the %s (%s): their Acc is "
        "NaN and left out of mAcc, and their IoU is 0 where the model predicts them, else NaN "
        "and left out of mIoU, as in mmseg; expected ids %s",
        absent.size,
        self._num_classes,
        "has" if absent.size == 1 else "have",
        reporting.counted(count, "val image"),
        shown,
        seg_transforms.expected_ids(self._config.data),
    )


def warn_unknown_ids(
    data_config, annotations: int, count: int, ids: set[int], first: bool = False
) -> None:
  """A warning that `annotations` of the `count` val annotations (`first`: the first `count`,
  which a training run reads at its start) hold ids that are no class (this host's: `ids`): the
  metric leaves their pixels out (as mmseg's does), where training stops at such an id."""
  shown = reporting.listed([str(i) for i in sorted(ids)], 8)
  if count == 1:  # not '1 of the 1 val annotation hold'
    which = f"the {'first' if first else 'only'} val annotation holds"
  else:
    verb = "holds" if annotations == 1 else "hold"  # '1 of the 8 ... holds'
    which = f"{annotations} of the {'first ' if first else ''}{count} val annotations {verb}"
  logging.warning(
      "%s ids that are neither a class nor ignore_index (%s; expected %s): their pixels count "
      "in no class, as in mmseg; check config.data.num_classes and reduce_zero_label",
      which,
      f"e.g. {shown}" if shown else "on other hosts",
      seg_transforms.expected_ids(data_config),
  )


def _add(totals: dict[str, np.ndarray], areas: dict[str, np.ndarray]) -> None:
  """Adds one image's per-class areas (fetched from the device) to the running totals."""
  for k, v in areas.items():
    totals[k] += v


def _sum_over_hosts(totals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """int64 sums of every host's int64 arrays. Gathered as two int32 halves: jax arrays are
  int32 unless jax_enable_x64, and a set's per-class pixel counts can pass 2^31."""
  if jax.process_count() == 1:
    return totals
  out = {}
  for k, v in totals.items():
    halves = np.stack([v >> 31, v & (2**31 - 1)]).astype(np.int32)  # [2, K]
    gathered = np.asarray(multihost_utils.process_allgather(halves), np.int64)  # [P, 2, K]
    out[k] = (gathered[:, 0] << 31).sum(0) + gathered[:, 1].sum(0)
  return out


class Segmentation(Task):
  """config.model.name is an fpn_* segmenter; config.data is fec_jax.data.ade20k_config()."""

  EVALUATION_ONLY = frozenset({"data.size_divisor", "data.class_names"})
  BATCHED_EVALUATION = False

  def check_config(self) -> None:
    c = self.config
    if c.model.name not in SEGMENTERS:
      raise ValueError(
          f"config.model.name {c.model.name!r} is not a segmenter; choose one of "
          f"{sorted(SEGMENTERS)}{reporting.did_you_mean([c.model.name], sorted(SEGMENTERS))}"
      )
    data.seg_validate(c.data)
    if c.data.crop_size[0] % 32 or c.data.crop_size[1] % 32:
      side = c.data.demo_image_size
      follows = c.data.source == "demo" and tuple(c.data.crop_size) == (side, side)
      raise ValueError(
          f"config.data.crop_size {tuple(c.data.crop_size)} must be multiples of 32 "
          "(the FPN's maps are the crop's size /4, /8, /16, /32)"
          + (
              f"; the demo's crop_size is its demo_image_size, {side}: give a multiple of 32, "
              f"e.g. --config.data.demo_image_size={max(32, side // 32 * 32)}"
              if follows
              else ""
          )
      )
    if c.data.size_divisor % 32:
      raise ValueError(
          f"config.data.size_divisor {c.data.size_divisor} must be a multiple of 32 "
          "(val images are resized to multiples of it and fed whole to the model)"
      )
    data.seg_num_examples(c.data, "val")  # missing val data stops train.py and eval.py here

  def check_eval_data(self) -> None:
    """The first VAL_CHECKED val records (all, where there are no more; where none of them is
    readable, up to the first that is: data.seg_check_val) read as the evaluator reads them, so
    that a val split the first evaluation (after thousands of steps in the recipe) would stop on
    stops the run at its start: none readable in the whole split is DataNotFoundError naming the
    first and why, as the loader's bad-file warning does; ids that are no class get the
    evaluator's warning (process 0's). Every process reads the same records and all stop where
    one reads none of them. No random draw and no loader: training and evaluation are as without
    the check."""
    d = self.config.data
    labels, bad, records = data.seg_check_val(d, VAL_CHECKED)
    split, n = f"the val split of {data.data_location(d)}", len(labels) + len(bad)
    first = n < records  # else all its records
    if first:
      checked = f"its first {reporting.counted(n, 'record')}"
    else:
      checked = f"its {n} records" if n > 1 else "its only record"
    failed = np.int32(not labels)
    if jax.process_count() > 1:  # [processes]
      failed = np.asarray(multihost_utils.process_allgather(failed)).reshape(-1)
    if not labels:
      raise data.DataNotFoundError(
          f"{split} has no readable record in {checked} (read at the start of training, not "
          f"at its first evaluation hours in); the first: {bad[0]}"
      )
    if np.any(failed):
      raise data.DataNotFoundError(
          f"on process {np.flatnonzero(failed)[0]}, {split} has no readable record (its error "
          "line names the first and why): every process reads the val split"
      )
    if jax.process_index() != 0:  # the warnings are process 0's, as the evaluator's
      return
    if bad:
      logging.warning(
          "%s: %d of %s cannot be read, and every evaluation leaves %s out; the first: %s",
          split,
          len(bad),
          checked,
          "it" if len(bad) == 1 else "them",
          bad[0],
      )
    unknown = [seg_transforms.unknown_ids(label, d) for label in labels]
    if any(unknown):
      warn_unknown_ids(d, sum(map(bool, unknown)), n, set().union(*unknown), first)

  def input_shape(self) -> tuple[int, ...]:
    return (1, *self.config.data.crop_size, 3)

  def train_loader(self, process_index: int, process_count: int):
    c = self.config
    steps = data.seg_steps_per_epoch(c.data, c.global_batch_size, process_count)
    loader = data.create_seg_loader(
        c.data, "train", c.global_batch_size, c.seed, process_index, process_count
    )
    return loader, steps

  def loss_fn(self, model, mesh: Mesh):
    """batch {'image' uint8 [B, ch, cw, 3], 'label' uint8 [B, ch, cw], 'valid' int32 [B, 2]},
    (ch, cw) = config.data.crop_size (create_seg_loader). BatchNorm statistics are those of the
    global batch (the official SyncBN; fec_jax.fpn.BatchNorm)."""
    d = self.config.data

    def loss_fn(params, model_state, batch, key):
      images = seg_device_transforms.normalize(batch["image"], batch["valid"], d.mean, d.std)
      logits, model_state = model.apply(
          {"params": params, **model_state},
          images,
          train=True,
          mutable=["batch_stats"],
          rngs={"dropout": key},
      )
      labels = batch["label"].astype(jnp.int32)  # [B, ch, cw]
      return cross_entropy(logits, labels, d.ignore_index), dict(model_state)

    return loss_fn

  def evaluator(self, model, mesh: Mesh, compiler_options: dict | None = None) -> MeanIoU:
    if not isinstance(model, fpn.SemanticFPN):
      raise ValueError(
          f"the checkpoint holds {model_name(model)}, not a segmenter; "
          f"config.task 'segmentation' evaluates {sorted(SEGMENTERS)}"
      )
    self.check_num_classes(model)
    return MeanIoU(model, self.config, compiler_options)

  def fresh_start_warning(self) -> str | None:
    """The authors' recipe starts the backbone from an ImageNet classifier; the demo data, made
    for a run from scratch, gets no warning."""
    if self.config.data.source == "demo":
      return None
    name = self.config.model.name
    return (
        f"config.init_from is not set: {name} starts from random weights (the authors' recipe "
        f"starts its backbone from an ImageNet classifier: --config.init_from=a "
        f"{init_from_models(name)[0]} checkpoint)"
    )

  def adopt_pretrained(self, variables, pretrained, source: str):
    """From an ImageNet classifier or a dense backbone (fec_*_seg / fec_*_det; no 'backbone' in
    its params): as mmseg's Pretrained init of the backbone, every backbone param is loaded, a
    classifier's head and norm are ignored, the output norms norm0/2/4/6 (where the checkpoint
    has none), the neck and the decode head keep their init. From a segmenter: all its
    variables (params and batch_stats); conv_seg is re-initialized when only its number of
    classes differs. Anything else missing, unexpected or mis-shaped is an error."""
    if "backbone" in pretrained["params"]:
      return self._from_segmenter(variables, pretrained, source)
    return self._from_classifier(variables, pretrained, source)

  @staticmethod
  def _from_classifier(variables, pretrained, source: str):
    flat = lambda tree: flax.traverse_util.flatten_dict(tree, sep="/")
    backbone = flat(variables["params"]["backbone"])
    loaded = flat(pretrained["params"])
    ignored = sorted(k for k in loaded if k.split("/")[0] in CLASSIFIER_ONLY)
    kept = {k for k in backbone if k.split("/")[0] in OUTPUT_NORMS and k not in loaded}
    missing, unexpected, mismatched = checkpoint.compare_params(
        flax.traverse_util.unflatten_dict(
            {k: v for k, v in backbone.items() if k not in kept}, sep="/"
        ),
        flax.traverse_util.unflatten_dict(
            {k: v for k, v in loaded.items() if k not in ignored}, sep="/"
        ),
    )
    prefix = lambda d: {f"backbone/{k}": v for k, v in d.items()}
    checkpoint.raise_for_mismatch(prefix(missing), prefix(unexpected), prefix(mismatched), source)
    merged = checkpoint.merge_params(variables["params"]["backbone"], pretrained["params"], kept)
    params = {**variables["params"], "backbone": merged}
    norms = [n for n in OUTPUT_NORMS if any(k.startswith(f"{n}/") for k in kept)]
    if ignored:  # a classifier's head and final norm
      kind = "the classifier "
    elif not norms:  # the stage output norms too: an fec_*_seg / _det backbone
      kind = "the dense backbone "
    else:  # neither a head nor the output norms: the stages only
      kind = ""
    with_norms = "" if norms else f", {'/'.join(OUTPUT_NORMS)} included"
    note = (
        f"backbone: loaded from {kind}{source}{with_norms}; ignored: "
        f"{', '.join(ignored) or 'nothing'}; kept their init: "
        f"{', '.join(norms + ['neck', 'decode_head', 'batch_stats'])}"
    )
    return {**variables, "params": params}, [note]

  @staticmethod
  def _from_segmenter(variables, pretrained, source: str):
    params = variables["params"]
    missing, unexpected, mismatched = checkpoint.compare_params(params, pretrained["params"])
    reinit, mismatched, notes = checkpoint.reinit_classifier(
        mismatched, CONV_SEG, "decode_head/conv_seg", source
    )
    stats = variables.get("batch_stats", {})
    found_stats = pretrained.get("batch_stats", {})
    s_missing, s_unexpected, s_mismatched = checkpoint.compare_params(stats, found_stats)
    prefix = lambda d: {f"batch_stats/{k}": v for k, v in d.items()}
    checkpoint.raise_for_mismatch(
        {**missing, **prefix(s_missing)},
        {**unexpected, **prefix(s_unexpected)},
        {**mismatched, **prefix(s_mismatched)},
        source,
    )
    out = {**variables, "params": checkpoint.merge_params(params, pretrained["params"], reinit)}
    if stats:
      out["batch_stats"] = found_stats
    return out, notes

  def describe(self, metrics: dict[str, float]) -> str:
    return (
        f"mIoU {metrics['mIoU']:.2f}%  mAcc {metrics['mAcc']:.2f}%  "
        f"aAcc {metrics['aAcc']:.2f}%  ({reporting.counted(metrics['images'], 'val image')})"
    )

  def class_names(self) -> tuple[str, ...]:
    return classes.segmentation_names(self.config.data)
