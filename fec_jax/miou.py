"""Segmentation metric: mIoU, mAcc, aAcc from per-class areas summed over a whole set.

mmsegmentation 0.24's `intersect_and_union` / `total_intersect_and_union` / `eval_metrics`
(mmseg/core/evaluation/metrics.py), the metric of the authors' ADE20K results:
per image, pixels labeled ignore_index are dropped, and per class c
  area_intersect[c] = #{pred == label == c},  area_pred[c] = #{pred == c},
  area_label[c] = #{label == c},  area_union = area_pred + area_label - area_intersect;
the areas are summed over the set, then IoU = intersect / union and Acc = intersect / label
per class, mIoU and mAcc their means over the classes where they are defined (mmseg's
nanmean: a class with no union, resp. no label pixel, is left out), aAcc the summed
intersect over the summed label area. Values outside [0, num_classes) count nowhere, as
torch.histc's range drops them in mmseg.
"""

import jax.numpy as jnp
import numpy as np


def intersect_and_union(pred, label, num_classes: int, ignore_index: int = 255) -> dict:
  """Per-class pixel counts of prediction `pred` vs ground truth `label` (integer arrays of
  one shape, any rank: one image [H, W] or a batch [B, H, W]).

  Returns {'area_intersect', 'area_union', 'area_pred', 'area_label'}, each int32
  [num_classes]. Counting is a one-hot compare against the class ids and a sum, which XLA
  fuses into one reduction without materializing [..., num_classes]; a bincount would be
  a scatter-add, slow on TPU and serialized on GPU. int32 holds 2^31 pixels: sum the
  results over a set on the host in int64 (`summarize` takes such sums).
  """
  classes = jnp.arange(num_classes)  # [K]
  pred, label = jnp.asarray(pred), jnp.asarray(label)
  valid = (label != ignore_index)[..., None]  # [..., 1]
  pred_hot = (pred[..., None] == classes) & valid  # [..., K]
  label_hot = (label[..., None] == classes) & valid  # [..., K]
  axes = tuple(range(pred.ndim))
  area_intersect = jnp.sum(pred_hot & label_hot, axis=axes, dtype=jnp.int32)  # [K]
  area_pred = jnp.sum(pred_hot, axis=axes, dtype=jnp.int32)  # [K]
  area_label = jnp.sum(label_hot, axis=axes, dtype=jnp.int32)  # [K]
  return {
      "area_intersect": area_intersect,
      "area_union": area_pred + area_label - area_intersect,
      "area_pred": area_pred,
      "area_label": area_label,
  }


def summarize(totals: dict) -> dict:
  """{'mIoU', 'mAcc', 'aAcc'} in percent (floats, unrounded; mmseg prints them rounded to
  2 decimals) from the per-class areas of intersect_and_union summed over the whole set."""
  inter = np.asarray(totals["area_intersect"], np.float64)  # [K]
  union = np.asarray(totals["area_union"], np.float64)  # [K]
  label = np.asarray(totals["area_label"], np.float64)  # [K]
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / union  # [K], nan where union is 0
    acc = inter / label  # [K], nan where label is 0
  return {
      "mIoU": 100.0 * float(np.nanmean(iou)),
      "mAcc": 100.0 * float(np.nanmean(acc)),
      "aAcc": 100.0 * float(inter.sum() / label.sum()),
  }
