"""fec_jax.miou against a NumPy rendition of mmseg 0.24's metric (mmseg/core/evaluation)."""

import warnings

import jax
import numpy as np
import pytest

from fec_jax import miou


def mmseg_intersect_and_union(pred_label, label, num_classes, ignore_index):
  """mmseg intersect_and_union with torch.histc(bins=K, min=0, max=K - 1) as np.histogram."""
  mask = label != ignore_index
  pred_label, label = pred_label[mask], label[mask]
  intersect = pred_label[pred_label == label]

  def histc(x):
    return np.histogram(x.astype(np.float64), bins=num_classes, range=(0, num_classes - 1))[0]

  area_intersect, area_pred_label, area_label = histc(intersect), histc(pred_label), histc(label)
  area_union = area_pred_label + area_label - area_intersect
  return area_intersect, area_union, area_pred_label, area_label


def mmseg_eval_metrics(results, gt_seg_maps, num_classes, ignore_index):
  """total_intersect_and_union + total_area_to_metrics + the dataset's nanmean summary."""
  totals = [np.zeros(num_classes, np.float64) for _ in range(4)]
  for pred, gt in zip(results, gt_seg_maps):
    for t, area in zip(totals, mmseg_intersect_and_union(pred, gt, num_classes, ignore_index)):
      t += area
  inter, union, _, label = totals
  with np.errstate(divide="ignore", invalid="ignore"):
    iou, acc = inter / union, inter / label
  return {
      "aAcc": inter.sum() / label.sum() * 100,
      "mIoU": np.nanmean(iou) * 100,
      "mAcc": np.nanmean(acc) * 100,
  }


def _noisy_predictions(rng, gt, num_classes, error_rate):
  pred = gt.astype(np.int64).copy()
  pred[pred == 255] = rng.integers(0, num_classes, int((pred == 255).sum()))
  wrong = rng.random(gt.shape) < error_rate
  pred[wrong] = rng.integers(0, num_classes, int(wrong.sum()))
  return pred


def test_intersect_and_union_matches_mmseg_per_image():
  rng = np.random.default_rng(0)
  fn = jax.jit(miou.intersect_and_union, static_argnums=(2, 3))
  for k, shape in [(7, (13, 17)), (150, (64, 48)), (3, (5, 9))]:
    gt = rng.integers(0, k, shape).astype(np.uint8)
    gt[rng.random(shape) < 0.2] = 255
    pred = _noisy_predictions(rng, gt, k, 0.4)
    got = fn(pred, gt, k, 255)
    want = mmseg_intersect_and_union(pred, gt, k, 255)
    for name, w in zip(("area_intersect", "area_union", "area_pred", "area_label"), want):
      assert got[name].shape == (k,) and got[name].dtype == np.int32
      np.testing.assert_array_equal(np.asarray(got[name]), w, err_msg=name)
  batch = fn(np.stack([pred, pred]), np.stack([gt, gt]), 3, 255)  # [B, H, W] sums the batch
  np.testing.assert_array_equal(np.asarray(batch["area_label"]), 2 * want[3])


def test_summarize_matches_mmseg_eval_metrics_over_a_set():
  """Sums over images of different sizes; classes absent from a set's labels and predictions
  (no union) are left out of mIoU; a predicted-but-absent class counts 0 IoU, no Acc."""
  rng = np.random.default_rng(1)
  k = 12
  preds, gts = [], []
  for h, w in [(20, 30), (41, 17), (33, 33), (8, 50)]:
    gt = rng.integers(0, 9, (h, w)).astype(np.uint8)  # classes 9..11 never labeled
    gt[rng.random((h, w)) < 0.1] = 255
    pred = _noisy_predictions(rng, gt, 9, 0.3)
    pred[0, 0] = 10  # predicted, never labeled: IoU 0, Acc nan; class 9 and 11: no union
    preds.append(pred), gts.append(gt)
  fn = jax.jit(miou.intersect_and_union, static_argnums=(2, 3))
  totals = None
  for pred, gt in zip(preds, gts):
    areas = {n: np.asarray(a, np.int64) for n, a in fn(pred, gt, k, 255).items()}
    totals = areas if totals is None else {n: totals[n] + areas[n] for n in totals}
  got = miou.summarize(totals)
  want = mmseg_eval_metrics(preds, gts, k, 255)
  assert set(got) == {"mIoU", "mAcc", "aAcc"}
  for name in got:
    assert got[name] == pytest.approx(want[name], abs=1e-9), name
  assert totals["area_union"][9] == 0 and totals["area_union"][10] > 0
  perfect = miou.summarize(fn(gts[0], gts[0], k, 255))
  assert perfect == {"mIoU": 100.0, "mAcc": 100.0, "aAcc": 100.0}


def test_out_of_range_and_ignored_pixels_count_nowhere():
  gt = np.array([[0, 1, 255, 5, 2]], np.uint8)  # 5 >= num_classes: dropped like histc
  pred = np.array([[0, 2, 1, 5, 6]], np.int32)
  got = {n: np.asarray(a).tolist() for n, a in miou.intersect_and_union(pred, gt, 3).items()}
  want = mmseg_intersect_and_union(pred, gt, 3, 255)
  assert got["area_label"] == want[3].tolist() == [1, 1, 1]
  assert got["area_pred"] == want[2].tolist() == [1, 0, 1]
  assert got["area_intersect"] == want[0].tolist() == [1, 0, 0]
  assert got["area_union"] == want[1].tolist() == [1, 1, 2]


def test_summary_of_nothing_is_nan_without_warnings():
  """A set with no labeled pixel (nothing evaluated) gives NaN for every metric, quietly; a set
  whose only labeled pixels are another class's predictions gives 0 IoU."""
  zeros = {n: np.zeros(4, np.int64) for n in ("area_intersect", "area_union", "area_label")}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # numpy's RuntimeWarnings would fail here
    got = miou.summarize(zeros)
    assert set(got) == {"mIoU", "mAcc", "aAcc"} and all(np.isnan(v) for v in got.values()), got
    wrong = miou.summarize(miou.intersect_and_union(np.ones((2, 2)), np.zeros((2, 2)), 4))
    assert wrong == {"mIoU": 0.0, "mAcc": 0.0, "aAcc": 0.0}
