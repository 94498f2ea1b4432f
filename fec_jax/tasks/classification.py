"""Image classification with the official ImageNet recipe (docs/official-code.md Sec. 8):
timm's augmentation on the host (fec_jax.data), Mixup/CutMix, normalization and random erasing
per device, soft-target cross-entropy; evaluation by top-1, top-5 (with more than 5 classes) and
loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from fec_jax import checkpoint, data, reporting, training
from fec_jax.data import classes, device_transforms, mixup
from fec_jax.model import classifiers, is_classifier, model_name
from fec_jax.tasks import BatchEvaluator, Task

HEAD = ("head/kernel", "head/bias")  # the classifier: re-initialized when num_classes differs


def soft_target_cross_entropy(logits, targets):
  """timm SoftTargetCrossEntropy: mean over the batch of -sum(t * log_softmax(logits)), fp32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def per_device_augment(data_config, mesh: Mesh):
  """(key, images uint8 [B,S,S,3], erase boxes [B,4], labels [B]) -> (images f32, soft targets
  [B, K]): the device part of the recipe in the order of the official training, which runs
  timm's prefetcher (docs/official-code.md Sec. 8): Mixup/CutMix on the uint8 values
  (FastCollateMixup: the Mixup blend rounded to integers), then normalization, then the erasing
  fill on the mixed batch. Drawn separately on each device's shard (Mixup partner = that shard
  reversed), as the official per-GPU pipeline does; the key is folded with the device's position
  on the `data` axis."""
  d = data_config

  def augment(key, images, boxes, labels):  # [B / devices, ...]
    erase_key, mix_key = jax.random.split(
        jax.random.fold_in(key, jax.lax.axis_index(training.DATA_AXIS))
    )
    x, targets = mixup.mixup_cutmix(
        mix_key,
        images.astype(jnp.float32),  # [B / devices, S, S, 3] in [0, 255]
        labels,
        d.num_classes,
        mixup_alpha=d.mixup_alpha,
        cutmix_alpha=d.cutmix_alpha,
        prob=d.mixup_prob,
        switch_prob=d.mixup_switch_prob,
        label_smoothing=d.label_smoothing,
        round_blend=True,
    )
    x = device_transforms.normalize(x, d.mean, d.std)
    if d.reprob > 0:
      x = device_transforms.erase(erase_key, x, boxes, d.remode)
    return x, targets

  shard = P(training.DATA_AXIS)
  return jax.shard_map(
      augment, mesh=mesh, in_specs=(P(), shard, shard, shard), out_specs=(shard, shard)
  )


def eval_sums(logits, labels, mask, per_class: bool = False):
  """Sums over the real examples of a val batch: loss (hard-label CE), top-1 and top-5 hits (top-5
  only with more than 5 classes), count; with per_class also each class's count and hits, [K]."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  weight = mask.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  ranked = jax.lax.top_k(logits, min(5, num_classes))[1]  # [B, min(5, K)]
  hits = {"top1": ranked[:, 0] == labels}
  if num_classes > 5:  # with 5 classes or fewer every label is among the top 5
    hits["top5"] = jnp.any(ranked == labels[:, None], axis=-1)
  hits = {k: v.astype(jnp.float32) * weight for k, v in hits.items()}
  sums = {"loss": jnp.sum(loss * weight), **{k: jnp.sum(v) for k, v in hits.items()}}
  sums["count"] = jnp.sum(weight)
  if per_class:
    by_class = lambda x: jax.ops.segment_sum(x, labels, num_segments=num_classes)  # [K]
    sums["class_count"] = by_class(weight)
    sums.update({f"class_{k}": by_class(v) for k, v in hits.items()})
  return sums


class TopK(BatchEvaluator):
  """Top-1 / top-5 (%; top-5 with more than 5 classes) and hard-label loss over the val split, the
  official evaluation preprocessing (resize, center crop) on the host and normalization on the
  device."""

  def __init__(self, model, config, mesh: Mesh, compiler_options: dict | None = None):
    def eval_step(variables, batch, per_class):
      images = device_transforms.normalize(batch["image"], config.data.mean, config.data.std)
      logits = model.apply(variables, images, train=False)
      return eval_sums(logits, batch["label"], batch["mask"], per_class)

    dataset = data.create_dataset(
        config.data,
        "val",
        config.eval_batch_size,
        config.seed,
        jax.process_index(),
        jax.process_count(),
    )
    super().__init__(
        dataset,
        data.num_eval_batches(config.data, config.eval_batch_size),
        eval_step,
        lambda sums, per_class: _summarize(sums),  # per_class: the sums hold the classes' or not
        mesh,
        config.data,
        # bf16 results rounded where the program says: by default XLA may keep a fused bf16
        # intermediate in fp32, and what it fuses depends on the shapes, so an image's logits
        # would depend on eval_batch_size and the device count (docs/training.md, "Evaluation and
        # restoring").
        {**(compiler_options or {}), "xla_allow_excess_precision": False},
    )


def _summarize(totals: dict) -> dict[str, float]:
  """The val metrics from the sums of eval_sums over the split (images: how many it counted;
  an unreadable image is left out); per_class where the sums have the classes' (their rates NaN
  for a class without images). Top-5 where eval_sums summed it (more than 5 classes)."""
  n = float(totals["count"])
  rates = [k for k in ("top1", "top5") if k in totals]
  metrics = {
      "loss": float(totals["loss"]) / n,
      **{k: 100.0 * float(totals[k]) / n for k in rates},
      "images": int(totals["count"]),
  }
  if "class_count" in totals:
    count = np.asarray(totals["class_count"], np.float64)  # [K]
    with np.errstate(divide="ignore", invalid="ignore"):
      metrics["per_class"] = {
          "images": count.astype(np.int64),
          **{k: 100.0 * totals[f"class_{k}"] / count for k in rates},
      }
  return metrics


class Classification(Task):
  """config.model.name is a classification variant; config.data is fec_jax.data's config."""

  EVALUATION_ONLY = frozenset({"data.crop_pct", "data.eval_interpolation"})

  def check_config(self) -> None:
    c = self.config
    name, size = c.model.name, c.data.image_size
    if name not in classifiers():
      raise ValueError(
          f"config.model.name {name!r} is not a classification variant; "
          f"choose one of {classifiers()}{reporting.did_you_mean([name], classifiers())}"
      )
    if size % 32:
      raise ValueError(
          f"config.data.image_size {size} must be a multiple of 32 (every "
          "ClusterPool needs an even feature map: the maps are size/4, /8, /16, /32)"
      )
    data.validate(c.data)

  def check_training(self) -> None:
    """A head of one class learns nothing: its softmax is 1 whatever the image (a one-class
    folder dataset trained on with loss 0.0000 and top-1 100%). Mixup/CutMix pair each image of a
    device's batch with the batch reversed (timm's Mixup, which asserts an even batch): an odd
    batch per device would mix its middle image with itself."""
    c, devices = self.config, jax.device_count()
    if c.data.num_classes == 1:
      raise ValueError(
          "config.data.num_classes is 1: a classifier of one class gives it probability 1 "
          "whatever the image (loss 0, top-1 100%), so training learns nothing; expected 2 or "
          "more classes (for class-folder data, a folder per class in the train split)"
      )
    per_device = c.global_batch_size // devices
    mixing = (c.data.mixup_alpha > 0 or c.data.cutmix_alpha > 0) and c.data.mixup_prob > 0
    if mixing and per_device % 2:
      raise ValueError(
          f"config.global_batch_size {c.global_batch_size} over "
          f"{reporting.counted(devices, 'device')} is {per_device} images per device, an odd "
          "number: Mixup/CutMix pair each image with its device batch's flip (the batch "
          "reversed) and need an even count per device (the middle image would mix with itself); "
          f"give a global_batch_size that is a multiple of {2 * devices}, or turn them off "
          "(--config.data.mixup_alpha=0 --config.data.cutmix_alpha=0)"
      )

  def input_shape(self) -> tuple[int, ...]:
    return (1, self.config.data.image_size, self.config.data.image_size, 3)

  def train_loader(self, process_index: int, process_count: int):
    c = self.config
    steps = data.steps_per_epoch(c.data, c.global_batch_size, process_count)
    loader = data.create_loader(
        c.data, "train", c.global_batch_size, c.seed, process_index, process_count
    )
    return loader, steps

  def loss_fn(self, model, mesh: Mesh):
    """batch {'image' [B,S,S,3] uint8, 'erase' [B,4] i32, 'label' [B] i32}."""
    augment = per_device_augment(self.config.data, mesh)

    def loss_fn(params, model_state, batch, key):
      augment_key, drop_key = jax.random.split(key)
      images, targets = augment(augment_key, batch["image"], batch["erase"], batch["label"])
      logits = model.apply(
          {"params": params, **model_state}, images, train=True, rngs={"dropout": drop_key}
      )
      return soft_target_cross_entropy(logits, targets), model_state

    return loss_fn

  def evaluator(self, model, mesh: Mesh, compiler_options: dict | None = None) -> TopK:
    if not is_classifier(model):
      raise ValueError(
          f"the checkpoint holds {model_name(model)}, not a classifier; config.task "
          f"'classification' evaluates {classifiers()}"
      )
    self.check_num_classes(model)
    training.check_mesh(mesh)  # before the val data is opened
    return TopK(model, self.config, mesh, compiler_options)

  def adopt_pretrained(self, variables, pretrained, source: str):
    """Every param whose name and shape match is loaded; the head is re-initialized when only
    its number of classes differs; anything else missing, unexpected or mis-shaped is an error."""
    params = variables["params"]
    missing, unexpected, mismatched = checkpoint.compare_params(params, pretrained["params"])
    reinit, mismatched, notes = checkpoint.reinit_classifier(mismatched, HEAD, "head", source)
    checkpoint.raise_for_mismatch(missing, unexpected, mismatched, source)
    params = checkpoint.merge_params(params, pretrained["params"], keep=reinit)
    return {**variables, "params": params}, notes

  def describe(self, metrics: dict[str, float]) -> str:
    top5 = f"top-5 {metrics['top5']:.2f}%  " if "top5" in metrics else ""
    return (
        f"top-1 {metrics['top1']:.2f}%  {top5}"
        f"loss {metrics['loss']:.4f}  ({reporting.counted(metrics['images'], 'val image')})"
    )

  def class_names(self) -> tuple[str, ...]:
    k = self.config.data.num_classes
    return classes.classification_names(self.config.data, k) or classes.numbered(k)

  def data_label_names(self) -> data.LabelNames | None:
    """A folder run's train class folders (ImageNet's wnids too), a TFDS run's ClassLabel
    names."""
    return data.label_names(self.config.data)
