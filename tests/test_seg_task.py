"""The segmentation task on the training library (fec_jax.tasks.segmentation), its schedule and
optimizer options (fec_jax.training), in-process runs on the synthetic demo data at 32x32."""

import json
import os
import re
import shutil
import subprocess
import sys

import cv2
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from jax.experimental import multihost_utils
from PIL import Image, ImageDraw

import fec_jax
from configs import demo_seg, fpn_fec_small_ade20k
from fec_jax import checkpoint, data, loop, reporting, seg_picture, tasks, training
from fec_jax.data import seg_config
from fec_jax.model import FAST_COMPILE
from fec_jax.tasks import segmentation
from tests.ade20k_fixture import make_ade20k_folder
from tests.train_fixture import losses, save_step_3, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def seg_tiny(**overrides):
  """configs/demo_seg.py at 32x32, 16 train / 6 val images, batch 4, 4 steps, a record every
  step, a checkpoint every 2, one evaluation (at the end); overrides 'field' or 'a.field'."""
  c = demo_seg.get_config()
  c.data.demo_image_size, c.data.img_scale, c.data.crop_size = 32, (32, 32), (32, 32)
  c.data.demo_num_train, c.data.demo_num_val = 16, 6
  c.global_batch_size, c.max_steps, c.eval_every_steps = 4, STEPS, 100
  c.log_every_steps, c.checkpoint_every_steps, c.keep_checkpoints = 1, 2, 2
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  return c


ADE_SIZE = ((48, 64),)  # make_ade20k_folder's images: one size, one compile of the evaluator


def ade_tiny(root: str):
  """seg_tiny on an ADE20K-layout folder (make_ade20k_folder, 5 classes), its val images tested
  at 32x32 (at ADE20K's img_scale each image size was a minute-long compile and run at 512)."""
  config = seg_tiny(**{"data": data.ade20k_config()})
  config.data.root, config.data.num_classes, config.data.img_scale = root, 5, (32, 32)
  return config


@pytest.fixture(scope="module")
def fresh():
  """(task, fresh variables) of the tiny config's fpn_fec_small (5 classes)."""
  task = tasks.get(seg_tiny())
  model, _, _ = task.create_model()
  return task, fec_jax.init_variables(model, jax.random.key(1), (1, 32, 32, 3))


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, compilation_cache) -> str:
  workdir = tmp_path_factory.mktemp("seg_run")
  result = train(seg_tiny(), workdir)
  assert result.step == STEPS and not result.preempted
  return str(workdir)


def test_run_logs_miou_that_the_evaluator_reproduces(seg_run):
  records = reporting.read_metrics(seg_run)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert all(np.isfinite(r["train_loss"]) for r in records)
  last = records[-1]
  assert {"val_mIoU", "val_mAcc", "val_aAcc"} <= set(last)
  assert 0 <= last["val_mIoU"] <= 100 and 0 < last["val_aAcc"] <= 100
  model, variables = fec_jax.load_pretrained(seg_run)
  init = fec_jax.init_variables(model, jax.random.key(0), (1, 32, 32, 3))
  # The trained BatchNorm statistics were saved (not the init's zeros and ones).
  assert not np.allclose(
      variables["batch_stats"]["decode_head"]["scale_heads_0_0"]["bn"]["mean"],
      init["batch_stats"]["decode_head"]["scale_heads_0_0"]["bn"]["mean"],
  )
  config = seg_tiny()
  task = tasks.get(config)
  evaluator = task.evaluator(model, training.create_mesh())
  metrics = evaluator(variables)
  metrics_init = evaluator(init)
  # Two weight sets in one pass over the images: each set's own metrics.
  assert evaluator.evaluate([variables, init]) == [metrics, metrics_init]
  assert metrics_init != metrics
  assert metrics == pytest.approx(
      {k[4:]: last[k] for k in ("val_mIoU", "val_mAcc", "val_aAcc", "val_images")}, abs=1e-9
  )
  assert task.describe(metrics).startswith(f"mIoU {metrics['mIoU']:.2f}%  mAcc ")
  assert task.describe(metrics).endswith("(6 val images)") and last["val_images"] == 6
  # Per class (eval.py --per_class): mmseg's table, whose means are mIoU and mAcc.
  by_class = evaluator(variables, per_class=True)
  table = by_class.pop("per_class")
  assert by_class == metrics and list(table) == ["IoU", "Acc"]
  assert np.nanmean(table["IoU"]) == pytest.approx(metrics["mIoU"], abs=1e-9)
  assert np.nanmean(table["Acc"]) == pytest.approx(metrics["mAcc"], abs=1e-9)
  rows = task.per_class_table(table).splitlines()
  assert [r.split()[0] for r in rows] == ["class", *seg_config.DEMO_CLASS_NAMES]
  assert rows[2].split()[1:] == [f"{table['IoU'][1]:.2f}", f"{table['Acc'][1]:.2f}"]


def test_per_class_table_names_the_classes_of_the_config(tmp_path):
  """ADE20K's names (mmseg's) for its 150 classes, config.data.class_names for one's own, and
  'nan' for a class the val split has no pixel of, as in mmseg's table."""
  config = seg_tiny(**{"data": data.ade20k_config()})
  task = tasks.get(config)
  assert task.class_names()[:3] == ("wall", "building", "sky") and len(task.class_names()) == 150
  assert task.class_names()[7] == "bed" and task.class_names()[-1] == "flag"
  config.data.num_classes, config.data.class_names = 3, ("road", "sky", "car")
  table = {"IoU": np.array([50.0, np.nan, 12.345]), "Acc": np.array([75.0, np.nan, 20.0])}
  assert task.per_class_table(table).splitlines() == [
      "class    IoU    Acc",
      "road   50.00  75.00",
      "sky      nan    nan",
      "car    12.35  20.00",
  ]
  config.data.class_names = ()
  assert task.class_names() == ("class 0", "class 1", "class 2")


def test_evaluator_refuses_a_val_split_with_no_readable_image(fresh, tmp_path):
  root = make_ade20k_folder(tmp_path / "ade", sizes=ADE_SIZE)
  for path in (tmp_path / "ade" / "images" / "validation").iterdir():
    path.write_bytes(b"")
  task, variables = tasks.get(ade_tiny(root)), fresh[1]
  model = task.create_model()[0]
  with pytest.raises(data.DataNotFoundError, match=f"no readable val image in {root}"):
    task.evaluator(model, training.create_mesh(), FAST_COMPILE)(variables)


def test_evaluator_refuses_a_val_split_with_no_labelled_pixel(fresh, tmp_path):
  """Annotations of 0 ('other') only, reduced to 255: the mIoU would be NaN."""
  root = make_ade20k_folder(tmp_path / "ade", sizes=ADE_SIZE)
  for path in (tmp_path / "ade" / "annotations" / "validation").iterdir():
    with Image.open(path) as label:
      Image.fromarray(np.zeros_like(np.asarray(label))).save(path)
  task, variables = tasks.get(ade_tiny(root)), fresh[1]
  model = task.create_model()[0]
  expected = f"no labelled pixel in the 3 val images of {root}: every annotation pixel is "
  expected += "ignore_index 255 after reduce_zero_label (0 -> 255) or a class id >= config"
  with pytest.raises(data.DataNotFoundError, match=re.escape(expected)):
    task.evaluator(model, training.create_mesh(), FAST_COMPILE)(variables)


def edit_val_annotations(ade, edit) -> None:
  """Rewrites each val annotation of the ADE20K folder `ade` (sorted) with edit(i, label [H, W])."""
  for i, path in enumerate(sorted((ade / "annotations" / "validation").iterdir())):
    with Image.open(path) as label:
      label = np.asarray(label).copy()
    edit(i, label)
    Image.fromarray(label).save(path)


def test_evaluator_warns_of_classes_without_a_labelled_pixel(fresh, tmp_path, caplog):
  """Classes with no pixel in the val annotations have NaN Acc, and NaN IoU (left out of mIoU,
  as in mmseg) unless predicted: a binary mask saved as 0/255 scores 100% on its background
  alone where the model predicts it alone, so a warning names them. Here the fresh model
  predicts two of the three (IoU 0, in mIoU)."""
  root = make_ade20k_folder(tmp_path / "ade", sizes=ADE_SIZE)

  def ignore_above_2(_, label):  # ids 1, 2 -> classes 0, 1; the others ignored
    label[label > 2] = 255

  edit_val_annotations(tmp_path / "ade", ignore_above_2)
  task, variables = tasks.get(ade_tiny(root)), fresh[1]
  evaluator = task.evaluator(task.create_model()[0], training.create_mesh(), FAST_COMPILE)
  with caplog.at_level("WARNING"):
    scores = evaluator(variables, per_class=True)["per_class"]
  assert (
      "3 of the 5 classes have no labelled pixel in the 3 val images ('class 2', 'class 3', "
      "'class 4'): their Acc is NaN and left out of mAcc, and their IoU is 0 where the model "
      "predicts them, else NaN and left out of mIoU, as in mmseg; expected ids 0 ('other'), "
      "1..5 (config.data.num_classes 5 with reduce_zero_label) or 255 (ignore_index)"
  ) in caplog.messages
  assert np.isnan(scores["Acc"][2:]).all() and np.isnan(scores["IoU"][2])
  np.testing.assert_array_equal(scores["IoU"][3:], 0.0)
  caplog.clear()
  with caplog.at_level("WARNING"):
    evaluator(variables)  # a training run's next evaluation: the same annotations
  assert not caplog.messages
  with caplog.at_level("WARNING"):
    evaluator._warn_absent(np.array([4]), 1)  # the verb agrees with one class
  assert caplog.messages[0].startswith(
      "1 of the 5 classes has no labelled pixel in the 1 val image ('class 4'): their Acc"
  )


def test_evaluator_warns_of_ids_that_are_no_class_and_stops_when_asked(fresh, tmp_path, caplog):
  """Val ids that are neither a class nor ignore_index count nowhere (mmseg): a wrong
  num_classes or reduce_zero_label would change the score unseen, so a warning names them as the
  files store them. `stop` ends the evaluation after the image under way."""
  root = make_ade20k_folder(tmp_path / "ade", sizes=ADE_SIZE)

  def no_class_in_two(i, label):  # the first annotation: id 9 in a corner; the second 200..209
    if i == 0:
      label[:2, :2] = 9
    elif i == 1:
      label[0, :10] = np.arange(200, 210)

  edit_val_annotations(tmp_path / "ade", no_class_in_two)
  task, variables = tasks.get(ade_tiny(root)), fresh[1]
  evaluator = task.evaluator(task.create_model()[0], training.create_mesh(), FAST_COMPILE)
  with caplog.at_level("WARNING"):
    evaluator(variables)
  assert (
      "2 of the 3 val annotations hold ids that are neither a class nor ignore_index (e.g. 9, "
      "200, 201, 202, 203, 204, 205, 206 and 3 more; expected 0 ('other'), 1..5 "
      "(config.data.num_classes 5 with reduce_zero_label) or 255 "
      "(ignore_index)): their pixels count in no class, as in mmseg; check "
      "config.data.num_classes and reduce_zero_label"
  ) in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    evaluator(variables)
  assert not caplog.messages
  with pytest.raises(tasks.EvaluationStopped, match="^stopped after 1 of 3 val images$"):
    evaluator(variables, stop=lambda: True)


def test_a_run_reads_the_first_val_records_at_its_start(tmp_path, monkeypatch, caplog):
  """The recipe evaluates first after 8,000 steps: a training run reads the first VAL_CHECKED
  val records at its start, before it compiles (here _run, which compiles, only says it was
  reached), as the evaluator reads them. None readable stops it, naming the first and why; ids
  that are no class get the evaluator's warning, unreadable records one too."""
  root = make_ade20k_folder(tmp_path / "ade", num_val=10, sizes=ADE_SIZE)
  monkeypatch.setattr(loop, "_run", lambda *args: "started")
  annotations = sorted((tmp_path / "ade" / "annotations" / "validation").iterdir())
  for path in annotations:  # colour maps
    with Image.open(path) as label:
      label.convert("RGB").save(path)
  with pytest.raises(data.DataNotFoundError) as e:
    train(ade_tiny(root), tmp_path / "run")
  assert str(e.value) == (  # all 10 read: none of the first VAL_CHECKED was readable
      f"the val split of {root} has no readable record in its 10 records (read at the start "
      "of training, not at its first evaluation hours in); the first: "
      "images/validation/ADE_val_00000001.jpg: annotation "
      "annotations/validation/ADE_val_00000001.png: mode RGB; expected a single-channel PNG "
      "of class ids ('L' or 'P'; or 1-bit, ids 0 and 1; or 16-bit, ids up to 255)"
  )
  assert not (tmp_path / "run").exists()
  Image.fromarray(np.full((48, 64), 9, np.uint8)).save(annotations[1])  # readable, id 9
  with caplog.at_level("WARNING"):
    assert train(ade_tiny(root), tmp_path / "run") == "started"
  assert caplog.messages[-2:] == [  # after the note that there is no init_from
      f"the val split of {root}: 7 of its first 8 records cannot be read, and every evaluation "
      "leaves them out; the first: images/validation/ADE_val_00000001.jpg: annotation "
      "annotations/validation/ADE_val_00000001.png: mode RGB; expected a single-channel PNG "
      "of class ids ('L' or 'P'; or 1-bit, ids 0 and 1; or 16-bit, ids up to 255)",
      "1 of the first 8 val annotations holds ids that are neither a class nor ignore_index (e.g. "
      "9; expected 0 ('other'), 1..5 (config.data.num_classes 5 with reduce_zero_label) or 255 "
      "(ignore_index)): their pixels count in no class, as in mmseg; check "
      "config.data.num_classes and reduce_zero_label",
  ]


def test_a_val_split_whose_first_records_cannot_be_read_is_read_on(tmp_path, monkeypatch, caplog):
  """The first VAL_CHECKED val records unreadable, the last two fine: the evaluation scores those
  two (the others masked out), so the start reads on up to the first readable record and warns,
  where it stopped the run."""
  root = make_ade20k_folder(tmp_path / "ade", num_val=10, sizes=ADE_SIZE)
  monkeypatch.setattr(loop, "_run", lambda *args: "started")
  annotations = sorted((tmp_path / "ade" / "annotations" / "validation").iterdir())
  for path in annotations[:8]:
    path.write_bytes(b"")
  with caplog.at_level("WARNING"):
    assert train(ade_tiny(root), tmp_path / "run") == "started"
  assert caplog.messages[-1] == (
      f"the val split of {root}: 8 of its first 9 records cannot be read, and every evaluation "
      "leaves them out; the first: images/validation/ADE_val_00000001.jpg: annotation "
      "annotations/validation/ADE_val_00000001.png: empty file"
  )


def test_a_val_split_of_fewer_records_than_read_at_the_start_is_named_whole(
    tmp_path, monkeypatch, caplog
):
  """A val split of 3 records, fewer than VAL_CHECKED: the start reads them all, and its warnings
  say so ('1 of its 3 records', not '1 of its first 3 records ... leaves them out')."""
  root = make_ade20k_folder(tmp_path / "ade", sizes=ADE_SIZE)
  monkeypatch.setattr(loop, "_run", lambda *args: "started")
  annotations = sorted((tmp_path / "ade" / "annotations" / "validation").iterdir())
  annotations[0].write_bytes(b"")
  Image.fromarray(np.full((48, 64), 9, np.uint8)).save(annotations[1])  # readable, id 9
  with caplog.at_level("WARNING"):
    assert train(ade_tiny(root), tmp_path / "run") == "started"
  assert caplog.messages[-2:] == [
      f"the val split of {root}: 1 of its 3 records cannot be read, and every evaluation leaves "
      "it out; the first: images/validation/ADE_val_00000001.jpg: annotation "
      "annotations/validation/ADE_val_00000001.png: empty file",
      "1 of the 3 val annotations holds ids that are neither a class nor ignore_index (e.g. 9; "
      "expected 0 ('other'), 1..5 (config.data.num_classes 5 with reduce_zero_label) or 255 "
      "(ignore_index)): their pixels count in no class, as in mmseg; check "
      "config.data.num_classes and reduce_zero_label",
  ]


def test_a_val_split_of_one_record_with_ids_that_are_no_class_is_warned_of_in_the_singular(
    tmp_path, caplog
):
  """A val split of one annotation with id 9 (5 classes): the start's warning said '1 of the 1
  val annotation hold ids'."""
  root = make_ade20k_folder(tmp_path / "ade", num_val=1, sizes=ADE_SIZE)
  (annotation,) = (tmp_path / "ade" / "annotations" / "validation").iterdir()
  Image.fromarray(np.full((48, 64), 9, np.uint8)).save(annotation)
  with caplog.at_level("WARNING"):
    tasks.get(ade_tiny(root)).check_eval_data()
  assert caplog.messages == [
      "the only val annotation holds ids that are neither a class nor ignore_index (e.g. 9; "
      "expected 0 ('other'), 1..5 (config.data.num_classes 5 with reduce_zero_label) or 255 "
      "(ignore_index)): their pixels count in no class, as in mmseg; check "
      "config.data.num_classes and reduce_zero_label"
  ]


def test_every_process_stops_where_one_reads_no_val_record(tmp_path, monkeypatch):
  """The processes gather whether each read a val record: one that read none stops with its
  file's error after the gather (the others would wait in it otherwise), the others naming it."""
  root = make_ade20k_folder(tmp_path / "ade", sizes=ADE_SIZE)
  gathered, other = [], [0]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(
      multihost_utils,
      "process_allgather",
      lambda failed: gathered.append(int(failed)) or np.array([failed, other[0]]),
  )
  task = tasks.get(ade_tiny(root))
  task.check_eval_data()
  other[0] = 1  # process 1 reads none
  with pytest.raises(data.DataNotFoundError) as e:
    task.check_eval_data()
  assert str(e.value) == (
      f"on process 1, the val split of {root} has no readable record (its error line names the "
      "first and why): every process reads the val split"
  )
  other[0] = 0
  for path in (tmp_path / "ade" / "images" / "validation").iterdir():
    path.write_bytes(b"")
  with pytest.raises(data.DataNotFoundError, match="^the val split .* the first: images/val"):
    task.check_eval_data()
  assert gathered == [0, 0, 1]


def test_progress_lines_and_stop():
  lines, stopping = [], []
  progress = tasks.Progress(4, "image", lambda: bool(stopping), lines.append, every=0)
  progress.update(1, " (1 size compiled)")
  assert lines == ["evaluated 1 of 4 val images (1 size compiled) in 0:00:00"]
  quiet = tasks.Progress(4, "batch", None, lines.append)  # none in the first 30 s
  quiet.update(3)
  assert len(lines) == 1
  stopping.append(True)
  with pytest.raises(tasks.EvaluationStopped, match="^stopped after 2 of 4 val images$"):
    progress.update(2)
  progress.update(4)  # the last: the metrics are complete, no reason to drop them
  drawing = tasks.Progress(2, "image", None, lines.append, every=0, verb="predicted", split="")
  drawing.update(1)  # visualize_seg.py --image
  assert lines[-1] == "predicted 1 of 2 images in 0:00:00"
  one = tasks.Progress(1, "image", None, lines.append, every=0)  # it said '0 of 1 val images'
  one.update(0)
  assert lines[-1] == "evaluated 0 of 1 val image in 0:00:00"


def test_resume_restores_batch_stats(seg_run, tmp_path):
  """2 steps, then the same workdir to 4: per-step losses and the final batch_stats are those
  of the straight 4-step run, bit for bit (one CPU device)."""
  assert train(seg_tiny(max_steps=2), tmp_path).step == 2
  assert train(seg_tiny(), tmp_path).step == STEPS
  assert losses(tmp_path) == losses(seg_run)
  resumed = fec_jax.load_pretrained(str(tmp_path))[1]["batch_stats"]
  straight = fec_jax.load_pretrained(seg_run)[1]["batch_stats"]
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_a_frozen_backbone_keeps_its_weights_while_the_fpn_trains(seg_run, tmp_path):
  """config.frozen 'backbone/' from a segmenter's weights: after 2 steps the backbone is those
  weights bit for bit; the neck, the decode head and its BatchNorm statistics (no params: they
  are not frozen) have changed."""
  assert train(seg_tiny(init_from=seg_run, frozen="backbone/", max_steps=2), tmp_path).step == 2
  source = fec_jax.load_pretrained(seg_run)[1]
  tuned = fec_jax.load_pretrained(str(tmp_path))[1]
  backbone = lambda v: v["params"]["backbone"]
  jax.tree.map(np.testing.assert_array_equal, backbone(tuned), backbone(source))
  for changed in (
      lambda v: v["params"]["neck"]["fpn_convs_0"]["conv"]["kernel"],
      lambda v: v["params"]["decode_head"]["conv_seg"]["kernel"],
      lambda v: v["batch_stats"]["decode_head"]["scale_heads_0_0"]["bn"]["mean"],
  ):
    assert not np.array_equal(changed(tuned), changed(source))


def test_a_fresh_run_without_init_from_warns_but_not_on_the_demo(tmp_path, caplog):
  """The authors' recipe starts from ImageNet weights; the demo data is made for a run from
  scratch. The warning comes before the data is opened."""
  warning = (
      "config.init_from is not set: fpn_fec_small starts from random weights (the authors' recipe "
      "starts its backbone from an ImageNet classifier: --config.init_from=a fec_small checkpoint)"
  )
  for config, warned in ((fpn_fec_small_ade20k.get_config(), True), (seg_tiny(), False)):
    caplog.clear()
    with caplog.at_level("WARNING"):
      loop._start(config, str(tmp_path / "w"), tasks.get(config))
    assert (warning in caplog.messages) == warned, caplog.messages


def test_init_from_classifier_loads_the_backbone(reference, fresh):
  """The conftest `reference` run is fec_small classification: its params go into
  fpn_fec_small's backbone; head and norm are ignored; norm0/2/4/6, neck, head keep init."""
  task, fresh = fresh
  _, pretrained = fec_jax.load_pretrained(reference)
  variables, notes = task.adopt_pretrained(fresh, pretrained, "REF")
  backbone = variables["params"]["backbone"]
  for name in ("patch_embed", "network_0", "network_5"):
    jax.tree.map(np.testing.assert_array_equal, backbone[name], pretrained["params"][name])
  for name in ("norm0", "norm6"):
    jax.tree.map(np.testing.assert_array_equal, backbone[name], fresh["params"]["backbone"][name])
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["neck"], fresh["params"]["neck"])
  jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], fresh["batch_stats"])
  assert notes == [
      "backbone: loaded from the classifier REF; ignored: head/bias, head/kernel, norm/bias, "
      "norm/scale; kept their init: norm0, norm2, norm4, norm6, neck, decode_head, batch_stats"
  ]


def test_init_from_a_dense_backbone_loads_its_output_norms_too(fresh):
  """A fec_small_seg (or _det) checkpoint, e.g. an mmseg backbone converted with --model
  fec_small_seg, holds norm0/2/4/6: every backbone param comes from it."""
  task, fresh = fresh
  pretrained = {"params": jax.tree.map(lambda a: np.asarray(a) + 1.0, fresh["params"]["backbone"])}
  variables, notes = task.adopt_pretrained(fresh, pretrained, "SEGBACKBONE")
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["backbone"], pretrained["params"])
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["neck"], fresh["params"]["neck"])
  assert notes == [
      "backbone: loaded from the dense backbone SEGBACKBONE, "
      "norm0/norm2/norm4/norm6 included; ignored: nothing; kept their init: neck, decode_head, "
      "batch_stats"
  ]


def test_init_from_misfits_are_listed(reference, fresh):
  task, fresh = fresh
  _, pretrained = fec_jax.load_pretrained(reference)
  flat = flax.traverse_util.flatten_dict(pretrained["params"], sep="/")
  flat.pop("patch_embed/proj/bias")
  flat["network_0/extra"] = np.zeros(3)
  flat["network_1/conv_f/kernel"] = np.zeros((1, 1))
  broken = {"params": flax.traverse_util.unflatten_dict(flat, sep="/")}
  with pytest.raises(checkpoint.CheckpointError) as e:
    task.adopt_pretrained(fresh, broken, "BROKEN")
  message = str(e.value)
  assert "BROKEN do not fit this model (3 problems)" in message
  for name in (
      "backbone/patch_embed/proj/bias",
      "backbone/network_0/extra",
      "backbone/network_1/conv_f/kernel",
  ):
    assert name in message


def test_init_from_segmenter_reinitializes_conv_seg_for_other_classes(fresh):
  task, fresh = fresh  # 5 classes
  source = jax.tree.map(lambda a: np.asarray(a) + 1.0, fresh)  # a segmenter with 7 classes
  source["params"]["decode_head"]["conv_seg"] = {
      "kernel": np.ones((128, 7), np.float32),
      "bias": np.ones(7, np.float32),
  }
  variables, notes = task.adopt_pretrained(fresh, source, "SEG7")
  assert notes == [
      "decode_head/conv_seg re-initialized for 5 classes (SEG7 has 7); the other weights come "
      "from it"
  ]
  head = variables["params"]["decode_head"]
  jax.tree.map(
      np.testing.assert_array_equal, head["conv_seg"], fresh["params"]["decode_head"]["conv_seg"]
  )
  jax.tree.map(
      np.testing.assert_array_equal,
      head["scale_heads_0_0"],
      source["params"]["decode_head"]["scale_heads_0_0"],
  )
  jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], source["batch_stats"])
  with pytest.raises(checkpoint.CheckpointError, match="batch_stats/decode_head"):
    task.adopt_pretrained(fresh, {"params": fresh["params"], "batch_stats": {}}, "NOSTATS")


def test_cross_entropy_is_mmseg_decode_head_loss():
  """resize to the label size (bilinear, align_corners=False), CE with ignore 255, averaged
  over all pixels (mmseg 0.24's avg_non_ignore=False), against torch."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)  # [B, h, w, K]
  labels = rng.integers(0, 6, (2, 16, 20))
  labels[rng.random(labels.shape) < 0.3] = 255
  ours = segmentation.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 255)
  up = F.interpolate(
      torch.from_numpy(logits).permute(0, 3, 1, 2),
      size=(16, 20),
      mode="bilinear",
      align_corners=False,
  )
  per_pixel = F.cross_entropy(up, torch.from_numpy(labels), ignore_index=255, reduction="none")
  np.testing.assert_allclose(float(ours), float(per_pixel.mean()), rtol=1e-5)
  assert abs(float(per_pixel.mean()) - float(per_pixel[labels != 255].mean())) > 1e-3


def test_poly_schedule_and_run_length():
  c = fpn_fec_small_ade20k.get_config()
  schedule = training.lr_schedule(c, steps_per_epoch=1263)
  assert float(schedule(0)) == pytest.approx(1e-4)
  assert float(schedule(40_000)) == pytest.approx(1e-4 * 0.5**0.9)
  assert float(schedule(79_999)) == pytest.approx(1e-4 * (1 / 80_000) ** 0.9)
  assert float(schedule(80_000)) == 0.0
  assert training.peak_lr(c) == 1e-4  # lr_base_batch_size 0: not scaled with the batch
  assert training.total_steps(c, 1263) == 80_000
  c.max_steps = 10
  assert training.total_steps(c, 1263) == 10
  due = [s for s in range(1, 24_001) if training.eval_due(c, s, 1263)]
  assert due == [8000, 16000, 24000]
  # Classification keeps its per-epoch cosine, scaled by batch / 1024, eval every epoch.
  from configs import fec_small

  k = fec_small.get_config()
  k.global_batch_size = 512
  assert float(training.lr_schedule(k, 10)(1234)) == pytest.approx(
      float(training.epoch_lr(123, 5e-4, 5, 300, 1e-6, 1e-6))
  )
  assert [s for s in range(1, 31) if training.eval_due(k, s, 10)] == [10, 20, 30]


def test_weight_decay_on_all_params_or_matrices():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "conv_f": {"kernel": jnp.ones(3)}}
  zero = jax.tree.map(jnp.zeros_like, params)
  for on, bias_decays in (("all", True), ("matrices", False)):
    c = fpn_fec_small_ade20k.get_config()
    c.weight_decay, c.weight_decay_on = 0.5, on
    tx = training.create_optimizer(c, lambda step: 0.1)
    updates, _ = tx.update(zero, tx.init(params), params)  # Adam's part is 0 for 0 gradients
    new = optax.apply_updates(params, updates)
    assert float(new["kernel"][0, 0]) == pytest.approx(1 - 0.1 * 0.5)  # decoupled: lr * wd
    assert (float(new["bias"][0]) < 1.0) == bias_decays
    assert float(new["conv_f"]["kernel"][0]) == 1.0  # no gradient, no decay (official AdamW)


def test_a_run_saved_with_an_unmasked_adamw_resumes(tmp_path):
  """Before ClusterPool's conv_f left weight decay, weight_decay_on="all" meant an AdamW without
  a mask, whose state lacks the mask's node: such a run resumes with every array in place."""
  import grain

  c = fpn_fec_small_ade20k.get_config()
  params = {"conv_f": {"kernel": jnp.ones((2, 3))}, "head": {"bias": jnp.arange(3.0)}}
  old_tx = optax.adamw(lambda step: 0.1, weight_decay=c.weight_decay)  # as before, no mask
  old_state = old_tx.init(params)
  _, old_state = old_tx.update(jax.tree.map(jnp.ones_like, params), old_state, params)
  state = save_step_3(tmp_path, params, old_state, "fpn_fec_small")
  data_iter = iter(grain.MapDataset.range(8).to_iter_dataset())
  next(data_iter)
  new_opt_state = training.create_optimizer(c, lambda step: 0.1).init(params)
  assert jax.tree.structure(new_opt_state) != jax.tree.structure(old_state)
  abstract = jax.eval_shape(lambda: state.replace(opt_state=new_opt_state))
  with checkpoint.training_manager(tmp_path, keep=1) as mngr:
    restored = checkpoint.restore_training(mngr, abstract, data_iter, 3)
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(new_opt_state)
  jax.tree.map(
      np.testing.assert_array_equal, jax.tree.leaves(restored.opt_state), jax.tree.leaves(old_state)
  )
  assert int(restored.step) == 3 and next(data_iter) == 1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.name", "fec_small", "is not a segmenter"),
        ("data.crop_size", (48, 64), "must be multiples of 32"),
        ("data.size_divisor", 16, "size_divisor 16 must be a multiple of 32"),
        ("lr_schedule", "cosine", "lr_schedule must be one of"),
        ("schedule_steps", 0, "schedule_steps must be > 0"),
        ("weight_decay_on", "some", "weight_decay_on must be one of"),
        ("data.root", "/data/ade", "root '/data/ade' is read by source 'ade20k' only, and sou"),
    ],
)
def test_config_checks(field, value, message):
  c = seg_tiny(**{field: value})
  with pytest.raises(ValueError, match=message):
    training.check_config(c)
    tasks.get(c).check_config()


def test_a_demo_image_size_that_is_no_multiple_of_32_is_named_with_one_that_is():
  """The demo's crop_size follows demo_image_size: the error says so."""
  c = demo_seg.get_config()
  c.data.demo_image_size = 80
  with pytest.raises(ValueError) as e:
    tasks.get(c).check_config()
  assert str(e.value) == (
      "config.data.crop_size (80, 80) must be multiples of 32 (the FPN's maps are the crop's "
      "size /4, /8, /16, /32); the demo's crop_size is its demo_image_size, 80: give a multiple "
      "of 32, e.g. --config.data.demo_image_size=64"
  )
  c.data.demo_image_size = 96
  tasks.get(c).check_config()
  assert tasks.get(c).input_shape() == (1, 96, 96, 3)


def test_reduce_zero_label_needs_ignore_index_255():
  """mmseg's reduce_zero_label writes 255 for annotation 0, whatever the loss ignores."""
  c = seg_config.ade20k_config()
  c.ignore_index = 200
  with pytest.raises(ValueError, match=r"needs ignore_index 255 \(got 200\); or give"):
    seg_config.validate(c)
  c.reduce_zero_label = False
  seg_config.validate(c)


def command(script: str, *args: str) -> subprocess.CompletedProcess:
  """One of the repository's commands, run on the CPU."""
  return subprocess.run(
      [sys.executable, script, *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
      timeout=120,
  )


def test_visualize_seg_makes_the_output_folder_only_for_the_picture(tmp_path):
  """A missing --output folder is no mistake (visualize.py makes its --out too), but it is made
  only to write the picture: a mistake found later (here: no checkpoint) leaves none behind."""
  result = command(
      "visualize_seg.py", f"--workdir={tmp_path}", f"--output={tmp_path}/missing/seg.png"
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path} ")
  assert "missing does not exist" not in result.stderr and not (tmp_path / "missing").exists()


def test_visualize_seg_draws_the_predictions_with_a_legend_of_the_classes_shown(seg_run, tmp_path):
  """Rows of image, ground truth and prediction, and under them the legend (wrapped to the
  picture's width): a swatch and a name (config.data.class_names) for each class they show."""
  output = tmp_path / "seg.png"
  names = "('void', 'disc', 'square', 'triangle', 'cross')"
  result = command(
      "visualize_seg.py",
      f"--workdir={seg_run}",
      f"--output={output}",
      "--num=2",
      "--size=64",
      f"--config.data.class_names={names}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout == f"wrote {output} (2 val images)\n"
  with Image.open(output) as picture:
    pixels = np.asarray(picture.convert("RGB"))
  # titles, 2 rows of a name and 64-pixel panels (32x32 zoomed x2)
  rows_end = 16 + 2 * (16 + 64 + 4) + 4
  assert pixels.shape[1] == 3 * 64 + 4 * 4
  for r, name in enumerate(["shapes-val-0", "shapes-val-1"]):  # the records' file names
    y = 16 + r * (16 + 64 + 4)
    np.testing.assert_array_equal(pixels[y : y + 16, 4 : 4 + 64], name_line(name, 64))
  legend_lines, leftover = divmod(pixels.shape[0] - rows_end - 4, 16)
  assert legend_lines >= 1 and leftover == 0
  assert tuple(pixels[rows_end + 7, 8]) == (40, 40, 40)  # the first swatch: 'void', label 0
  one_name = "--config.data.class_names=('void',)"
  result = command("visualize_seg.py", f"--workdir={seg_run}", f"--output={output}.2.png", one_name)
  assert result.returncode == 2 and not os.path.exists(f"{output}.2.png")
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.data: class_names holds 1 name ('void',) for 5 classes")
  result = command(
      "visualize_seg.py", f"--workdir={seg_run}", f"--output={output}.3.png", "--step=3"
  )
  assert result.returncode == 2 and not os.path.exists(f"{output}.3.png")
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {seg_run} has no step 3; saved steps: [2, 4]"
  )
  args = [f"--workdir={seg_run}", f"--output={output}.4.png", "--num=1", "--size=32", "--step=2"]
  assert command("visualize_seg.py", *args).returncode == 0


def test_seg_picture_overlay_alpha():
  """alpha weighs the class colour over the image: 1 paints the colours alone (as the legend's
  swatches), 0 leaves the image; a label outside the palette (ignore index) leaves it too."""
  image = np.full((2, 3, 3), 100, np.uint8)
  label = np.array([[0, 1, 255], [1, 0, 1]], np.uint8)
  colours = np.array([[200, 0, 0], [0, 50, 250]], np.uint8)
  painted = seg_picture.overlay(image, label, colours, alpha=1.0)
  np.testing.assert_array_equal(painted[label != 255], colours[label[label != 255]])
  np.testing.assert_array_equal(painted[0, 2], image[0, 2])
  np.testing.assert_array_equal(seg_picture.overlay(image, label, colours, alpha=0.0), image)
  blended = seg_picture.overlay(image, label, colours)  # the default, 0.6
  np.testing.assert_array_equal(blended[0, 0], [160, 40, 40])


@pytest.mark.parametrize("size, shape", [(32, (32, 32)), (32, (96, 32)), (48, (64, 48))])
def test_seg_picture_titles_fit_their_panels(size, shape):
  """At a small --size (or a tall image) a column title is shortened ("ground truth" -> "truth")
  or cut to its panel's width, measured with the font it is drawn in: the titles never run into
  each other (they did: "ground truthprediction"), and the gaps between panels stay white."""
  pen = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  for forms in seg_picture.TITLES:
    for width in range(0, 80):
      title = seg_picture.fit_title(forms, width, lambda t: seg_picture.text_width(pen, t))
      assert seg_picture.text_width(pen, title) <= width
      assert title in forms or forms[-1].startswith(title)
    wide = seg_picture.fit_title(forms, 200, lambda t: seg_picture.text_width(pen, t))
    assert wide == forms[0]  # in full where it fits
  image = np.full((*shape, 3), 128, np.uint8)
  label = np.zeros(shape, np.uint8)
  picture = seg_picture.draw(
      [(image, label, label)], np.array([[0, 0, 255]], np.uint8), ("x",), size
  )
  titles = np.asarray(picture)[:16]  # the title band
  step = round(shape[1] * size / shape[0]) + seg_picture.PAD  # a panel and the gap after it
  for gap in (step, 2 * step, 3 * step):  # the gap's columns: from gap to gap + PAD
    assert (titles[:, gap : gap + seg_picture.PAD] == 255).all(), gap


def name_line(name: str, width: int) -> np.ndarray:
  """The pixels of a row's name as seg_picture.draw draws it: its line (16 high) over the row's
  first panel, `width` pixels wide, the name fitted to it."""
  line = Image.new("RGB", (width, 16), "white")
  pen = ImageDraw.Draw(line)
  fitted = seg_picture.fit_name(name, width, lambda t: seg_picture.text_width(pen, t))
  pen.text((0, 2), fitted, fill="black")
  return np.asarray(line)


def test_seg_picture_names_each_row_above_its_first_panel():
  """With several images one tells which row is which: each row under its name (visualize_seg.py:
  the file's), on a line of its own above the row's first panel, shortened in the middle
  ("...", the end kept: ADE20K's names differ there) where the panel is narrower."""
  pen = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  fit = lambda name, width: seg_picture.fit_name(
      name, width, lambda t: seg_picture.text_width(pen, t)
  )
  ade = "ADE_val_00000001.jpg"
  for width in range(0, 120):
    assert seg_picture.text_width(pen, fit(ade, width)) <= width
  assert fit(ade, 200) == ade and fit(ade, 80) == "ADE_val...001.jpg"
  image = np.full((32, 64, 3), 128, np.uint8)
  label = np.zeros((32, 64), np.uint8)
  args = [(image, label, label)] * 2, np.array([[0, 0, 255]], np.uint8), ("x",), 32
  names = ("a.jpg", ade)
  pixels = np.asarray(seg_picture.draw(*args, row_names=names))
  assert pixels.shape[0] == np.asarray(seg_picture.draw(*args)).shape[0] + 2 * 16
  for r, name in enumerate(names):
    y = 16 + r * (16 + 32 + 4)  # the titles, then a row: its name, its panels and a gap
    np.testing.assert_array_equal(pixels[y : y + 16, 4 : 4 + 64], name_line(name, 64))
    np.testing.assert_array_equal(pixels[y + 16 : y + 16 + 32, 4 : 4 + 64], image)
  assert (pixels[16 : 16 + 16, 4 : 4 + 64] < 128).any()  # drawn: dark pixels on the white line
  assert fit(ade, 64).startswith("ADE") and fit(ade, 64).endswith("...1.jpg")  # cut to 64


def test_seg_picture_keeps_the_panels_of_rows_of_other_sizes_under_their_titles():
  """Images of other shapes (visualize_seg.py --image wide.png square.png): each column is as
  wide as its widest panel, so a narrower row's panels start under their titles (they were
  packed to the left, its prediction under the wide row's ground truth)."""
  colours = np.array([[40, 40, 40], [230, 25, 75]], np.uint8)
  wide, square = np.full((32, 64, 3), 128, np.uint8), np.full((32, 32, 3), 64, np.uint8)
  rows = [(wide, np.zeros((32, 64), np.uint8)), (square, np.ones((32, 32), np.uint8))]
  pixels = np.asarray(
      seg_picture.draw(rows, colours, ("a", "b"), 32, 1.0, seg_picture.IMAGE_TITLES)
  )
  assert pixels.shape[1] == 2 * 64 + 3 * seg_picture.PAD
  y = 16 + 32 + seg_picture.PAD  # the titles, the first row and its gap
  np.testing.assert_array_equal(pixels[y : y + 32, 4 : 4 + 32], square)
  assert (pixels[y : y + 32, 4 + 64 + 4 :][:, :32] == colours[1]).all()  # its prediction
  assert (pixels[y : y + 32, 4 + 32 : 4 + 64 + 4] == 255).all()  # white beside the square
  for left in (4, 4 + 64 + 4):  # each title starts at its column, over both rows' panels
    assert (pixels[:16, left : left + 8] < 128).any(), left


def swatches(pixels: np.ndarray, colours: np.ndarray) -> set[int]:
  """The classes whose legend swatch (an 11x11 square of the class colour) a picture shows."""
  found = set()
  for c, colour in enumerate(colours):
    same = (pixels == colour).all(-1)
    if (
        same.shape[0] >= 11
        and np.lib.stride_tricks.sliding_window_view(same, (11, 11)).all(axis=(-1, -2)).any()
    ):
      found.add(c)
  return found


def test_seg_picture_of_images_without_annotation():
  """Rows of (image, prediction): two panels a row, and the legend names the classes predicted."""
  colours = np.array([[40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200]])
  image = np.full((32, 32, 3), 128, np.uint8)
  pred = np.ones((32, 32), np.uint8)
  pred[:, 20:] = 3
  picture = seg_picture.draw(
      [(image, pred)], colours.astype(np.uint8), tuple("abcde"), 32, 1.0, seg_picture.IMAGE_TITLES
  )
  pixels = np.asarray(picture)
  assert pixels.shape[1] == 2 * 32 + 3 * seg_picture.PAD
  np.testing.assert_array_equal(pixels[16 : 16 + 32, 4 + 32 + 4 :][:, :32], colours[pred])
  assert swatches(pixels, colours) == {1, 3}


def test_seg_picture_of_a_very_wide_or_narrow_image():
  """A 1x50-pixel image made panels of 192 x 9600 (a picture 28816 pixels wide): a panel is at
  most WIDEST times --size wide, with fewer rows, and its row no higher. A 50x1 image keeps its
  panels 4 pixels wide, and the picture is as wide as the legend's widest name."""
  colours = np.array([[40, 40, 40], [230, 25, 75]], np.uint8)
  pen = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  legend = seg_picture.SWATCH + seg_picture.text_width(pen, "background") + 2 * seg_picture.PAD
  for shape, (rows, columns) in (((1, 50), (15, 768)), ((50, 1), (192, 4))):
    image = np.full((*shape, 3), 128, np.uint8)
    label = np.zeros(shape, np.uint8)
    pixels = np.asarray(
        seg_picture.draw([(image, label, label)], colours, ("background", "x"), 192)
    )
    width = 3 * columns + 4 * seg_picture.PAD
    assert pixels.shape[:2] == (16 + rows + 3 * seg_picture.PAD + 16, max(width, legend)), shape
    np.testing.assert_array_equal(pixels[16 : 16 + rows, 4 : 4 + columns], 128)
    assert seg_picture.panel_size(*shape, 192) == (rows, columns)  # visualize_seg.py --image's
  assert seg_picture.panel_size(48, 64, 192) == (192, 256)  # as before: 192 rows


def test_visualize_seg_draws_a_very_wide_image_of_ones_own_at_its_panels_size(seg_run, tmp_path):
  """--image predicts at the panel's size: a 1x50-pixel image's, 768 x 15 (not 9600 x 192)."""
  Image.fromarray(np.full((1, 50, 3), 128, np.uint8)).save(tmp_path / "line.png")
  output = tmp_path / "line_seg.png"
  result = command(
      "visualize_seg.py",
      f"--workdir={seg_run}",
      f"--output={output}",
      "--image",
      str(tmp_path / "line.png"),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with Image.open(output) as picture:
    assert picture.size == (2 * 768 + 3 * seg_picture.PAD, 16 + 16 + 15 + 3 * 4 + 16)


def test_visualize_seg_draws_images_of_ones_own(seg_run, tmp_path):
  """--image: a row per file with the image and the prediction (no ground truth; the model is
  given the val split's test resize, and the prediction made at the panel's size). The files are
  read as visualize.py reads them: upright by their EXIF orientation (a phone photo), grayscale,
  alpha and CMYK as RGB. The legend shows the classes predicted (--alpha 1: the prediction
  panels hold the class colours alone)."""
  stripes = np.zeros((40, 80, 3), np.uint8)  # stored 80 wide, 40 high: red over blue
  stripes[:20], stripes[20:] = (220, 30, 30), (30, 30, 220)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show (40 wide, 80 high)
  Image.fromarray(stripes).save(tmp_path / "photo.jpg", exif=exif, quality=95)
  Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))).save(tmp_path / "g.png")
  rgba = np.zeros((48, 64, 4), np.uint8)
  rgba[..., 1], rgba[..., 3] = 200, 100
  Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
  Image.fromarray(stripes).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
  files = [tmp_path / f for f in ("photo.jpg", "g.png", "alpha.png", "cmyk.jpg")]
  output = tmp_path / "mine.png"
  result = command(
      "visualize_seg.py",
      f"--workdir={seg_run}",
      f"--output={output}",
      "--size=32",
      "--alpha=1",
      "--image",
      *map(str, files),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (result.stdout, result.stderr) == (f"wrote {output} (4 images)\n", "")
  with Image.open(output) as picture:
    pixels = np.asarray(picture.convert("RGB"))
  widths = [16, 43, 43, 64]  # each image's width at 32 rows: 40x80 upright, 64x48, 64x48, 80x40
  assert pixels.shape[1] == max(2 * w + 3 * 4 for w in widths)  # two panels, no ground truth
  rows = [pixels[32 + r * 52 : 32 + r * 52 + 32] for r in range(4)]  # titles; name, panels, gap
  column = max(widths)  # each column as wide as its widest panel
  for r, file in enumerate(files):  # each file's name above its first column, fitted to it
    np.testing.assert_array_equal(
        pixels[16 + r * 52 : 32 + r * 52, 4 : 4 + column], name_line(file.name, column)
    )
  upright = cv2.imread(str(files[0]))[..., ::-1]  # as the official script and visualize.py read
  assert upright.shape == (80, 40, 3)
  expected = np.asarray(Image.fromarray(upright).resize((16, 32), Image.BILINEAR))
  np.testing.assert_array_equal(rows[0][:, 4:20], expected)
  assert (rows[0][:, 20 : 4 + column + 4] == 255).all()  # beside the narrow panel: white
  gray = rows[1][:, 4 : 4 + 43].astype(int)
  assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
  assert (rows[2][:, 4 : 4 + 43] == (0, 200, 0)).all()  # alpha dropped, as in training
  cmyk = rows[3][:, 4 : 4 + 64].astype(int)
  assert (cmyk[:12, :, 0] > 150).all() and (cmyk[20:, :, 2] > 150).all()  # red over blue
  palette = seg_picture.palette(seg_tiny().data)
  predicted = set()
  for row, w in zip(rows, widths):  # each prediction under the title of the second column
    colours = np.unique(row[:, 4 + column + 4 : 4 + column + 4 + w].reshape(-1, 3), axis=0)
    predicted |= {int(np.flatnonzero((palette == c).all(-1))[0]) for c in colours}  # all classes
  assert swatches(pixels[16 + 4 * 52 :], palette) == predicted


def test_visualize_seg_notes_a_split_smaller_than_num(seg_run, tmp_path):
  """--num 8 of a split of 6: the picture of the 6, and a note that there are no more; nothing
  else on stderr (absl's info lines only with --verbosity). The --output folders are made.
  With --alpha 1 the ground truth is drawn in the palette's colours alone."""
  output = tmp_path / "new" / "folder" / "seg.png"
  result = command(
      "visualize_seg.py",
      f"--workdir={seg_run}",
      f"--output={output}",
      "--num=8",
      "--size=32",
      "--alpha=1",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout == f"wrote {output} (6 val images)\n"
  assert result.stderr == (
      "note: --num 8: the validation split of the demo data holds only 6 readable images\n"
  )
  with Image.open(output) as picture:
    pixels = np.asarray(picture.convert("RGB"))
  truth = pixels[32 : 32 + 32, 4 + 32 + 4 : 4 + 2 * 32 + 4]  # row 1 (under its name), panel 2
  palette = {tuple(c) for c in seg_picture.palette(seg_tiny().data)}
  assert {tuple(c) for c in truth.reshape(-1, 3)} <= palette


def test_eval_py_throughput_of_a_segmenter_times_its_crop_size(seg_run):
  timing = ["--batch=2", "--warmup=0", "--iters=1"]
  result = command("eval.py", f"--workdir={seg_run}", "--throughput", *timing)
  assert result.returncode == 0, result.stderr[-3000:]
  crop = "x".join(map(str, seg_tiny().data.crop_size))
  assert result.stdout.startswith("throughput: ") and result.stdout.endswith(
      f" img/s (fpn_fec_small, float32, {crop}, batch 2, 1 cpu device)\n"
  ), result.stdout


def test_eval_py_throughput_of_a_segmenter_whose_data_moved(seg_run, tmp_path):
  """--throughput times the model on zeros: the run's ADE20K folder, gone, is no error (the
  segmenter's check of its val split is for an evaluation)."""
  workdir = shutil.copytree(seg_run, tmp_path / "run")
  saved = reporting.read_config(str(workdir))
  saved["data"].update(source="ade20k", root=str(tmp_path / "gone"))
  (workdir / reporting.CONFIG_FILE).write_text(json.dumps(saved))
  timing = ["--batch=2", "--warmup=0", "--iters=1"]
  result = command("eval.py", f"--workdir={workdir}", "--throughput", *timing)
  assert result.returncode == 0 and result.stdout.startswith("throughput: "), result.stderr[-3000:]


def test_eval_py_timing_flags_without_throughput_name_a_segmenters_batch(seg_run):
  # the segmentation evaluator does not read --config.eval_batch_size, which the error named
  result = command("eval.py", f"--workdir={seg_run}", "--batch=2")
  assert (result.returncode, result.stderr) == (
      2,
      "error: --batch: used only with --throughput; the evaluation's batch is one image (this "
      "task's evaluator takes one at a time)\n",
  )


def test_a_segmenters_eval_batch_size_is_not_split_over_the_devices(seg_run, monkeypatch):
  """The segmentation evaluator takes one image at a time: eval.py on 3 devices evaluates the
  run (its eval_batch_size 16, which 3 does not divide, was an error), and train.py's checks
  leave the field alone too, as a classifier's they do not."""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
  result = subprocess.run(
      [sys.executable, "eval.py", f"--workdir={seg_run}"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=env,
      timeout=120,
  )
  assert result.returncode == 0 and result.stdout.startswith("mIoU "), result.stderr[-3000:]
  monkeypatch.setattr(jax, "device_count", lambda: 3)
  config = seg_tiny(global_batch_size=6, eval_batch_size=16)
  training.check_config(config, tasks.get(config).BATCHED_EVALUATION)
  config.task = "classification"  # whose evaluator splits its batches over the devices
  with pytest.raises(ValueError, match="config.eval_batch_size 16 must be a positive multiple"):
    training.check_config(config, tasks.get(config).BATCHED_EVALUATION)
