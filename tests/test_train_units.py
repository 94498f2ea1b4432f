"""Fast checks of the training pieces against the official recipe (docs/official-code.md Sec. 8); no
model compilation."""

import importlib
import itertools
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import multihost_utils

import fec_jax
from configs import demo, demo_seg, fec_base, fec_large, fec_small, finetune
from fec_jax import data, loop, preemption, reporting, tasks, training
from fec_jax.model import param_shapes
from fec_jax.tasks import classification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_official_configs_hold_the_recipe():
  for get_config, name in (
      (fec_small.get_config, "fec_small"),
      (fec_base.get_config, "fec_base"),
      (fec_large.get_config, "fec_large"),
  ):
    c = get_config()
    assert c.model.name == name and c.model.dtype == "bfloat16"
    assert (c.base_lr, c.global_batch_size, c.weight_decay) == (1e-3, 1024, 0.05)
    assert (c.b1, c.b2, c.eps) == (0.9, 0.999, 1e-8)
    assert (c.epochs, c.warmup_epochs, c.cooldown_epochs, c.warmup_lr, c.min_lr) == (
        300,
        5,
        10,
        1e-6,
        1e-6,
    )
    assert c.ema_decay == 0.9998 and c.model.drop_path_rate == 0.1
    assert c.data.to_dict() == data.default_config().to_dict()
  assert demo.get_config().data.source == "demo"


def test_lr_scales_linearly_with_the_global_batch():
  assert training.scaled_lr(1e-3, 1024) == 1e-3
  assert training.scaled_lr(1e-3, 256) == 2.5e-4
  assert training.scaled_lr(1e-3, 4096) == 4e-3


def test_schedule_is_per_epoch_warmup_cosine_cooldown():
  c = fec_small.get_config()
  c.global_batch_size = 2048  # peak 2e-3
  peak, spe = 2e-3, 7
  sched = training.lr_schedule(c, steps_per_epoch=spe)
  expected = {
      0: 1e-6,
      1: 1e-6 + (peak - 1e-6) / 5,
      4: 1e-6 + 4 * (peak - 1e-6) / 5,
      5: 1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * 5 / 300)),
      150: 1e-6 + 0.5 * (peak - 1e-6),
      299: 1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * 299 / 300)),
      300: 1e-6,
      309: 1e-6,
  }
  for epoch, lr in expected.items():
    for step in (epoch * spe, epoch * spe + spe - 1):  # constant within the epoch
      assert float(sched(step)) == pytest.approx(lr, rel=1e-5), (epoch, step)
  assert training.total_steps(c, spe) == 310 * spe
  c.max_steps = 5
  assert training.total_steps(c, spe) == 5


def test_weight_decay_mask_is_timms_groups_without_conv_f():
  params = param_shapes(fec_jax.create_model("fec_small", num_classes=10))
  mask = flax.traverse_util.flatten_dict(training.weight_decay_mask(params))
  decayed = {"/".join(k) for k, v in mask.items() if v}
  kept = {"/".join(k) for k, v in mask.items() if not v}
  assert decayed and all(k.endswith("kernel") for k in decayed)
  conv_f = {f"network_{i}/conv_f/{p}" for i in (1, 3, 5) for p in ("kernel", "bias")}
  assert conv_f <= kept  # no gradient: torch's AdamW skips it, weight decay included
  assert all(
      k.rsplit("/", 1)[1]
      in ("bias", "scale", "layer_scale_1", "layer_scale_2", "sim_alpha", "sim_beta")
      for k in kept - conv_f
  )
  assert "network_0/layer_scale_1" in kept  # [3, 32]: stacked over the stage's blocks, still 1-D
  assert len(decayed) + len(kept) == len(mask)
  every = flax.traverse_util.flatten_dict(training.weight_decay_mask(params, "all"))
  assert {"/".join(k) for k, v in every.items() if not v} == conv_f


def test_frozen_params_get_no_update_no_weight_decay_and_no_moments():
  """config.frozen's params go to optax.set_to_zero: after AdamW steps with weight decay and
  clipping they are as they were, and the optimizer state holds Adam's moments for the trained
  params only; the EMA of a frozen param stays too. Without config.frozen the optimizer is the
  one of a run before the field (the same state layout)."""
  params = {
      "network_0": {"fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}},
      "network_1": {"conv_f": {"kernel": jnp.ones((4, 4))}},
      "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
  }
  c = demo.get_config()
  c.weight_decay, c.grad_clip_norm, c.frozen = 0.5, 1.0, "(?!head/)"
  moments = lambda opt_state: [  # mu and nu; the other leaves are step counts
      jax.tree_util.keystr(path)
      for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
      if leaf.ndim > 0
  ]
  plain = training.create_optimizer(demo.get_config(), lambda step: 0.1).init(params)
  assert isinstance(plain[0], optax.ScaleByAdamState) and len(moments(plain)) == 10
  tx = training.create_optimizer(c, lambda step: 0.1)
  opt_state = tx.init(params)
  assert len(moments(opt_state)) == 4 and all("['head']" in m for m in moments(opt_state))
  frozen = training.frozen_mask(params, c.frozen)
  new = params
  for _ in range(3):
    grads = jax.tree.map(jnp.ones_like, new)
    updates, opt_state = tx.update(grads, opt_state, new)
    new = optax.apply_updates(new, updates)
  for name in ("network_0", "network_1"):
    jax.tree.map(
        np.testing.assert_array_equal, updates[name], jax.tree.map(jnp.zeros_like, params[name])
    )
  assert not np.array_equal(new["head"]["kernel"], params["head"]["kernel"])
  ema = training.ema_update(params, new, 0.3, frozen)
  assert ema["network_0"]["fc"]["bias"] is params["network_0"]["fc"]["bias"]
  assert not np.array_equal(ema["head"]["bias"], params["head"]["bias"])


def test_the_train_step_computes_no_gradient_for_frozen_params():
  """The train step differentiates the trained params alone: a frozen param's gradient is 0
  (XLA leaves its computation out), so grad_norm is the trained params' gradient norm."""
  c = demo.get_config()
  c.frozen, c.ema_decay = "body/", 0.0
  params = {"body": {"kernel": jnp.full((3, 3), 0.5)}, "head": {"kernel": jnp.ones((3, 2))}}

  def loss_fn(params, model_state, batch, key):
    return jnp.sum(batch["x"] @ params["body"]["kernel"] @ params["head"]["kernel"]), model_state

  mesh = training.create_mesh()
  tx = training.create_optimizer(c, lambda step: 0.1)
  state = training.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      model_state={},
      opt_state=tx.init(params),
      ema_params=None,
      rng=jax.random.key_data(jax.random.key(0)),
  )
  state = jax.device_put(state, training.replicated(mesh))
  sharding = jax.tree.map(lambda a: a.sharding, state)
  step = training.make_train_step(loss_fn, tx, lambda step: 0.1, c, mesh, sharding)
  batch = {"x": jnp.ones((jax.device_count(), 3))}
  new, metrics = step(state, training.global_batch(jax.device_get(batch), mesh))
  head_grad = jax.grad(lambda h: loss_fn({**params, "head": h}, {}, batch, None)[0])(params["head"])
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(head_grad), rtol=1e-6)
  np.testing.assert_array_equal(new.params["body"]["kernel"], params["body"]["kernel"])
  assert not np.array_equal(new.params["head"]["kernel"], params["head"]["kernel"])


def test_frozen_is_matched_at_the_start_of_each_params_path():
  fec = param_shapes(fec_jax.create_model("fec_small", num_classes=10))
  fpn = param_shapes(fec_jax.create_model("fpn_fec_small", num_classes=5))
  frozen = lambda params, pattern: sorted(
      k
      for k, v in flax.traverse_util.flatten_dict(
          training.frozen_mask(params, pattern), sep="/"
      ).items()
      if v
  )
  assert frozen(fec, "(?!head/)") == sorted(
      k for k in flax.traverse_util.flatten_dict(fec, sep="/") if not k.startswith("head/")
  )
  assert frozen(fec, "head") == ["head/bias", "head/kernel"]
  assert frozen(fec, "") == []
  stem_and_first = frozen(fec, "patch_embed/|network_0/")
  assert stem_and_first[-1] == "patch_embed/proj/kernel" and len(stem_and_first) == 20
  assert frozen(fpn, "head") == []  # decode_head/... does not start with it
  backbone = frozen(fpn, "backbone/")
  assert backbone and all(k.startswith("backbone/") for k in backbone)
  assert training.check_frozen(fec, "") is None
  assert training.check_frozen(fec, "(?!head/)") == (
      "config.frozen '(?!head/)': 100 arrays (5,406,528 parameters) frozen, 2 arrays (3,210 "
      "parameters) trained"
  )
  with pytest.raises(ValueError) as e:
    training.check_frozen(fec, "heads")
  assert str(e.value) == (
      "config.frozen 'heads' matches no param: it is matched at the start of each param's path "
      "(re.match), and the paths start with head/, network_0/, network_1/, network_2/, "
      "network_3/, network_4/, network_5/, network_6/, norm/, patch_embed/; e.g. '(?!head/)' "
      "freezes all but the head, 'patch_embed/|network_0/' the stem and first stage"
  )
  with pytest.raises(
      ValueError,
      match=r"^config.frozen '\(\?!head/\)' matches every param: .* "
      r"start with backbone/, decode_head/, neck/; e.g. 'backbone/' freezes",
  ):
    training.check_frozen(fpn, "(?!head/)")
  with pytest.raises(ValueError, match=r"^config.frozen '\.' matches every param"):
    training.check_frozen(fec, ".")


@pytest.fixture
def two_processes(monkeypatch):
  """jax.process_count() 2, and process_allgather of this process's signal number (0: none)
  with the other's, other[0] -> (gathered: this process's numbers as gathered, other)."""
  gathered, other = [], [0]

  def allgather(signum):
    gathered.append(int(signum))
    return np.array([signum, other[0]])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils, "process_allgather", allgather)
  return gathered, other


def test_processes_agree_on_stopping_every_ten_steps_and_where_asked(two_processes):
  """With several processes, stop_now all-gathers the signals received every SYNC_EVERY_STEPS
  steps, and at any step where every process asks (the run's last step, after an evaluation).
  (tests/test_train_runs.py runs two processes.)"""
  gathered, other = two_processes
  p = preemption.Preemption()
  assert not p.stop_now(10) and p.reason is None
  p.signal_name = "SIGTERM"  # this process got the signal, the other did not
  assert not p.stop_now(7) and gathered == [0]
  assert p.stop_now(7, agree=True) and p.stop_now(10) and gathered == [0, 15, 15]
  assert p.reason == "SIGTERM"
  q = preemption.Preemption()  # the other process got SIGINT, this one none
  other[0] = signal.SIGINT.value
  assert q.stop_now(20) and q.reason == "SIGINT (received by another process)"
  assert q.signal_name is None  # a signal of its own still stops it cleanly, not at once


def test_a_signal_stops_an_evaluation_after_the_batch_under_way():
  p = preemption.Preemption()
  progress = tasks.Progress(30, "batch", loop._evaluation_stop(p), log=print)
  for done in range(1, 13):
    progress.update(done)
  p.signal_name = "SIGTERM"
  with pytest.raises(tasks.EvaluationStopped, match="^stopped after 13 of 30 val batches$"):
    progress.update(13)


def test_processes_stop_an_evaluation_together_after_a_tenth_batch(two_processes):
  """Several processes all-gather their signals after every tenth batch (as on steps) and stop
  together there, the processes without a signal too, so that none is left waiting in the next
  batch's collectives. The stopped evaluation is skipped; another error stands."""
  gathered, other = two_processes
  for mine, theirs, reason in (
      ("SIGTERM", 0, "SIGTERM"),
      (None, signal.SIGTERM.value, "SIGTERM (received by another process)"),
  ):
    p, gathered[:], other[0] = preemption.Preemption(), [], 0
    progress = tasks.Progress(30, "batch", loop._evaluation_stop(p), log=print)
    for done in range(1, 13):
      progress.update(done)
    p.signal_name, other[0] = mine, theirs
    for done in range(13, 20):
      progress.update(done)
    with pytest.raises(tasks.EvaluationStopped, match="^stopped after 20 of 30 val batches$"):
      progress.update(20)
    assert gathered == [0, signal.SIGTERM.value if mine else 0] and p.reason == reason
    error = tasks.EvaluationStopped("stopped after 20 of 30 val batches")
    assert loop._skip_failed_evaluation(p, 4, error, "skipped: the run is stopping")
    # Another error may be this process's alone (a save is collective): it stands.
    assert not loop._skip_failed_evaluation(p, 4, RuntimeError("worker"), "skipped")
  assert not loop._skip_failed_evaluation(preemption.Preemption(), 4, error, "skipped")


def test_ema_is_timm_model_ema_v2():
  ema = {"w": jnp.array([1.0, 2.0])}
  new = training.ema_update(ema, {"w": jnp.array([3.0, 4.0])}, 0.9)
  np.testing.assert_allclose(new["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4], rtol=1e-6)


def test_soft_target_cross_entropy_and_eval_sums():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0, -2.0, -3.0], [0.0, 3.0, 1.0, 0.5, 0.2, 0.1]])
  targets = jax.nn.one_hot(jnp.array([0, 2]), 6)
  ce = -np.mean([jax.nn.log_softmax(logits[0])[0], jax.nn.log_softmax(logits[1])[2]])
  assert float(classification.soft_target_cross_entropy(logits, targets)) == pytest.approx(
      ce, rel=1e-6
  )
  sums = classification.eval_sums(logits, jnp.array([0, 0]), jnp.array([True, True]))
  assert (float(sums["top1"]), float(sums["top5"]), float(sums["count"])) == (1.0, 1.0, 2.0)
  masked = classification.eval_sums(logits, jnp.array([0, 0]), jnp.array([True, False]))
  assert (float(masked["top1"]), float(masked["top5"]), float(masked["count"])) == (1.0, 1.0, 1.0)


def run_everywhere(monkeypatch, *processes):
  """loop._check_same_run_everywhere on process 0, where processes 0, 1, ... were given
  `processes`, (config, workdir) each: what the others contribute to each gather is recorded
  from one-process calls with their arguments. -> its error message, or None."""
  recorded = []
  for args in processes[1:]:
    calls = []
    monkeypatch.setattr(
        multihost_utils, "process_allgather", lambda x, calls=calls: calls.append(x) or x[None]
    )
    loop._check_same_run_everywhere(*args)
    recorded.append(calls)
  count = itertools.count()

  def gather(x):
    i = next(count)
    return np.stack([x, *(calls[i] for calls in recorded)])  # [processes, values]

  monkeypatch.setattr(multihost_utils, "process_allgather", gather)
  try:
    loop._check_same_run_everywhere(*processes[0])
  except ValueError as e:
    return str(e)


def test_processes_given_another_run_say_what_differs(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  advice = (
      " than process 0: give every process the same workdir and config (train.py: the same "
      "--workdir, --config and --config.* overrides)"
  )
  lr = demo.get_config()
  lr.base_lr = 0.05
  same = (demo.get_config(), "w")
  assert run_everywhere(monkeypatch, same, same, (demo.get_config(), str(tmp_path / "w"))) is None
  assert run_everywhere(monkeypatch, same, same, (lr, "w1")) == (
      "process 2 was given another workdir, config.base_lr" + advice
  )
  assert run_everywhere(monkeypatch, same, (demo_seg.get_config(), "w")) == (
      "process 1 was given another config file" + advice
  )

  def with_an_object():  # what JSON cannot hold is written with its address
    c = demo.get_config()
    with c.unlocked():
      c.my_object = object()
    return c, "w"

  assert run_everywhere(monkeypatch, with_an_object(), with_an_object()) is None


def test_lr_warning_for_a_peak_lr_the_schedule_cannot_decay():
  """configs/finetune.py (base_lr 1e-4 at batch 1024, min_lr 1e-6) at small batches."""

  def warning(batch):
    c = finetune.get_config()
    c.global_batch_size = batch
    return training.lr_warning(c)

  advice = (
      "; raise base_lr (for a small batch: --config.lr_base_batch_size=0, base_lr unscaled) or "
      "lower min_lr"
  )
  assert warning(16) == (
      "the peak lr 1.56e-06 (base_lr x global_batch_size / 1024) is less than twice min_lr 1e-06: "
      "the schedule hardly changes it" + advice
  )
  assert warning(4) == (
      "the peak lr 3.91e-07 (base_lr x global_batch_size / 1024) is below min_lr 1e-06: the "
      "schedule rises toward min_lr instead of decaying" + advice
  )
  assert warning(32) is None  # 3.1e-6


def test_max_steps_warning_where_the_schedule_ends_first():
  """A max_steps past the schedule's end (e.g. raised on a resume) is not reached: the run stops
  at the end of its schedule, and says so instead of stopping short of max_steps unannounced."""
  c = demo.get_config()  # 14 epochs, no cooldown
  assert training.max_steps_warning(c, 4) is None  # max_steps 0: the whole schedule
  c.max_steps = 56
  assert training.max_steps_warning(c, 4) is None
  c.max_steps = 400
  assert training.total_steps(c, 4) == 56
  advice = (
      " (in a new workdir: a resume keeps its run's schedule; --config.init_from=DIR starts from "
      "its weights)"
  )
  assert training.max_steps_warning(c, 4) == (
      "config.max_steps 400 is past the end of the schedule, step 56 ((epochs 14 + "
      "cooldown_epochs 0) x 4 steps per epoch): the run stops there; to train longer, raise "
      "config.epochs" + advice
  )
  s = demo_seg.get_config()  # poly over 1,000 steps
  s.max_steps = 1001
  assert training.max_steps_warning(s, 250) == (
      "config.max_steps 1001 is past the end of the schedule, step 1000 (schedule_steps): the "
      "run stops there; to train longer, raise config.schedule_steps" + advice
  )


def test_top5_only_with_more_than_5_classes():
  """With 5 classes or fewer every label is among the top 5: no top-5 sums, metric or column."""
  logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
  sums = classification.eval_sums(logits, jnp.array([0, 2]), jnp.array([True, True]), True)
  assert sorted(sums) == ["class_count", "class_top1", "count", "loss", "top1"]
  metrics = classification._summarize(jax.device_get(sums))
  assert metrics["top1"] == 50.0 and list(metrics["per_class"]) == ["images", "top1"]
  config = demo.get_config()
  config.data.num_classes = 3
  task = tasks.get(config)
  assert re.fullmatch(r"top-1 50.00%  loss \d\.\d{4}  \(2 val images\)", task.describe(metrics))
  assert task.per_class_table(metrics["per_class"]).splitlines()[0].split() == [
      "class",
      "images",
      "top1",
  ]
  wider = jnp.pad(logits, ((0, 0), (0, 3)), constant_values=-9.0)  # [2, 6]
  assert "top5" in classification.eval_sums(wider, jnp.array([0, 2]), jnp.array([True, True]))


def test_an_evaluations_line_counts_one_val_image_in_the_singular():
  """The tasks' evaluation lines said '(1 val images)'; they count with reporting.counted, as the
  other messages that give a count and its noun."""
  line = tasks.get(demo.get_config()).describe({"top1": 100.0, "loss": 0.5, "images": 1})
  assert line == "top-1 100.00%  loss 0.5000  (1 val image)"
  seg = {"mIoU": 50.0, "mAcc": 60.0, "aAcc": 70.0, "images": 1}
  assert tasks.get(demo_seg.get_config()).describe(seg).endswith("aAcc 70.00%  (1 val image)")
  assert [reporting.counted(n, "val image") for n in (0, 1, 2)] == [
      "0 val images",
      "1 val image",
      "2 val images",
  ]
  assert reporting.counted(2, "process") == "2 processes"  # a noun ending in s: es
  assert reporting.counted(3, "val batch") == "3 val batches"  # and in ch


def test_per_class_values_that_are_not_one_per_class_are_one_error():
  """A task of one's own (a multi-label head: a value per label, 2, where class_names() gives the
  4 class folders) got IndexError from eval.py --per_class's table, after the evaluation; a
  column longer than the names lost its values past them without a word."""
  config = demo.get_config()
  config.data.num_classes = 4
  task = tasks.get(config)
  for values in (np.array([50.0, 75.0]), np.arange(5.0), np.zeros((4, 2))):
    with pytest.raises(tasks.MetricsError) as e:
      task.per_class_table({"images": np.array([1, 2, 3, 4]), "acc": values})
    assert str(e.value) == (
        f"the per_class column 'acc' is of shape {values.shape}, but Classification.class_names() "
        "names 4 classes; expected one value per class: return them so, or override "
        "class_names() to name the classes the values are of"
    )
  assert task.per_class_table({"acc": np.arange(4.0)}).splitlines()[-1].split() == [
      "class",
      "3",
      "3.00",
  ]


AUGMENT_ON_4_DEVICES = """
import jax, jax.numpy as jnp
from fec_jax import data, training
from fec_jax.tasks.classification import per_device_augment
c = data.default_config()
c.num_classes, c.reprob = 4, 0.0
c.mean, c.std = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # normalize(x) = x
mesh = training.create_mesh()
augment = jax.jit(per_device_augment(c, mesh))
n = 8  # 2 images per device
images = (jnp.arange(n, dtype=jnp.uint8) * 10).reshape(n, 1, 1, 1)
images = images * jnp.ones((n, 4, 4, 3), jnp.uint8)
labels, no_erase = jnp.arange(n) % 4, jnp.zeros((n, 4), jnp.int32)
for seed in range(4):
  out, targets = augment(jax.random.key(seed), images, no_erase, labels)
  assert out.shape == images.shape and out.dtype == jnp.float32 and targets.shape == (n, 4)
  assert bool(jnp.allclose(targets.sum(-1), 1.0, atol=1e-5))
  for d in range(4):  # each device mixes only its own two images (partner = its shard reversed)
    shard = out[2 * d:2 * d + 2]
    assert float(shard.min()) >= 20 * d - 1e-4 and float(shard.max()) <= 20 * d + 10 + 1e-4, shard
  assert bool(jnp.all(out == jnp.round(out)))  # mixed uint8 values, the blend rounded
  assert not bool(jnp.allclose(out, images))  # something was mixed
c.reprob, c.mixup_prob = 1.0, 0.0  # erasing only: a 2x2 box at (1, 1) in every image
erase = jax.jit(per_device_augment(c, mesh))
boxes = jnp.tile(jnp.array([[1, 1, 2, 2]], jnp.int32), (n, 1))
out, _ = erase(jax.random.key(0), images, boxes, labels)
inside = jnp.zeros((4, 4), bool).at[1:3, 1:3].set(True)[None, :, :, None]
assert bool(jnp.allclose(jnp.where(inside, 0.0, out), jnp.where(inside, 0.0, images), atol=1e-4))
fills = out[:, 1:3, 1:3]
assert float(jnp.abs(fills - images[:, 1:3, 1:3]).min()) > 0  # every box pixel refilled
assert len({tuple(f.ravel().tolist()) for f in fills}) == n  # a draw per image and device
c.mixup_prob, c.cutmix_alpha = 1.0, 0.0  # Mixup only, and a box in image 0 of each device
boxes = jnp.zeros((n, 4), jnp.int32).at[::2].set(jnp.array([1, 1, 2, 2]))
both = jax.jit(per_device_augment(c, mesh))
for seed in range(4):  # erasing follows mixing: the partner of an erased image has no noise
  out, _ = both(jax.random.key(seed), images, boxes, labels)
  partners = out[1::2]  # [4, 4, 4, 3]: each one value, the rounded blend of its two images
  assert bool(jnp.all(partners == partners[:, :1, :1, :1])), partners[:, :, :, 0]
  assert float(jnp.abs(out[::2, 1:3, 1:3] - jnp.round(out[::2, 1:3, 1:3])).max()) > 0
print("ok")
"""


def test_augment_mixes_normalizes_and_erases_within_each_device_shard():
  env = {
      **os.environ,
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": REPO,
  }
  out = subprocess.run(
      [sys.executable, "-c", AUGMENT_ON_4_DEVICES],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_check_config_rejects_what_cannot_run():
  c = demo.get_config()
  training.check_config(c)
  tasks.get(c).check_config()
  for field, value, message in (
      ("data.image_size", 48, "multiple of 32"),
      ("model.name", "fec_small_seg", "classification"),
      ("model.dtype", "bf16", "dtype"),
      ("data.remode", "noise", "remode"),
      ("global_batch_size", 0, "positive multiple"),
      ("log_every_steps", 0, "log_every_steps"),
      ("task", "detection", "not a task"),
      ("warmup_epochs", -1, "0 <= warmup_epochs"),
      ("cooldown_epochs", -1, "cooldown_epochs"),
      ("ema_decay", 1.0, "ema_decay"),
      ("init_from_ema", True, "init_from, which is not set"),
      ("init_from_step", 3, r"a saved step of config.init_from \(-1: its latest\), got 3 without"),
      ("base_lr", -1.0, r"config.base_lr must be > 0, got -1.0"),
      ("warmup_lr", -1e-6, "warmup_lr must be >= 0"),
      ("min_lr", -1e-6, "min_lr must be >= 0"),
      ("poly_power", 0.0, "poly_power must be > 0"),
      ("weight_decay", -0.5, "weight_decay must be >= 0"),
      ("b1", 1.5, r"b1 must be in \[0, 1\)"),
      ("b2", -1.0, r"b2 must be in \[0, 1\)"),
      ("eps", 0.0, "eps must be > 0"),
      ("grad_clip_norm", -1.0, "grad_clip_norm must be >= 0"),
      ("model.drop_path_rate", 1.5, r"config.model.drop_path_rate must be in \[0, 1\)"),
      ("data.std", (0.0, 0.0, 0.0), "std must be > 0"),
      ("data.mixup_alpha", -1.0, "config.data: mixup_alpha must be >= 0, got -1.0"),
      ("data.reprob", 2.0, r"config.data: reprob must be in \[0, 1\], got 2.0"),
      ("data.num_workers", -2, r"num_workers must be >= -1 \(-1: one per CPU, 0: none\), got -2"),
      ("data.read_threads", 0, "config.data: read_threads must be >= 1, got 0"),
      ("data.rand_augment", "rand-m", "RandAugment section 'm' of 'rand-m' needs m followed by an"),
      ("data.rand_augment", "rand-m9-mstdx", "unknown RandAugment section 'mstdx'"),
      ("data.rand_augment", "rand-m9-p0.5x", "needs p followed by a number"),
      ("data.root", "/data/pets", "root '/data/pets' is read by source 'folder' only, and sou"),
      ("frozen", "network_(0", r"config.frozen 'network_\(0' is not a regular expression \(miss"),
  ):
    bad = demo.get_config()
    section, _, key = field.rpartition(".")
    (bad[section] if section else bad)[key] = value
    with pytest.raises(ValueError, match=message):
      training.check_config(bad)
      tasks.get(bad).check_config()


def test_a_negative_count_is_named_alone_with_its_value():
  """A field out of range is named with the value given, not beside another field that is fine
  (the message once read 'config.cooldown_epochs and config.max_steps must be >= 0')."""
  for field, other in (
      ("cooldown_epochs", "max_steps"),
      ("max_steps", "cooldown_epochs"),
      ("lr_base_batch_size", "eval_every_steps"),
      ("eval_every_steps", "lr_base_batch_size"),
  ):
    bad = demo.get_config()
    bad[field] = -1
    with pytest.raises(ValueError, match=rf"^config\.{field} must be >= 0.*, got -1$") as e:
      training.check_config(bad)
    assert other not in str(e.value)


def test_mixup_on_an_odd_batch_per_device_is_refused_for_training_only(monkeypatch):
  """The partner of image i is image B-1-i of the device's batch: an odd batch mixed its middle
  image with itself (timm's Mixup asserts an even batch). eval.py's checks do not read it."""
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  c = demo.get_config()
  c.data.mixup_alpha, c.global_batch_size = 0.8, 6
  task = tasks.get(c)
  task.check_config()  # what eval.py checks: an evaluation does not mix
  with pytest.raises(ValueError) as e:
    task.check_training()
  assert str(e.value) == (
      "config.global_batch_size 6 over 2 devices is 3 images per device, an odd number: "
      "Mixup/CutMix pair each image with its device batch's flip (the batch reversed) and need an "
      "even count per device (the middle image would mix with itself); give a global_batch_size "
      "that is a multiple of 4, or turn them off (--config.data.mixup_alpha=0 "
      "--config.data.cutmix_alpha=0)"
  )
  c.data.mixup_alpha, c.data.cutmix_alpha = 0.0, 1.0
  with pytest.raises(ValueError, match="3 images per device, an odd number"):
    task.check_training()
  c.data.mixup_prob = 0.0  # never mixes
  task.check_training()
  c.data.mixup_prob, c.global_batch_size = 1.0, 4
  task.check_training()
  c.data.cutmix_alpha, c.global_batch_size = 0.0, 6  # the demo's: no Mixup/CutMix
  task.check_training()


def test_a_classifier_of_one_class_is_refused_for_training():
  """A one-class dataset trained with loss 0.0000 and top-1 100% from the first step: the
  softmax of one logit is 1, so nothing was learned, and nothing said so."""
  c = demo.get_config()
  c.data.num_classes = 1
  task = tasks.get(c)
  task.check_config()
  with pytest.raises(ValueError) as e:
    task.check_training()
  assert str(e.value) == (
      "config.data.num_classes is 1: a classifier of one class gives it probability 1 whatever "
      "the image (loss 0, top-1 100%), so training learns nothing; expected 2 or more classes "
      "(for class-folder data, a folder per class in the train split)"
  )
  c.data.num_classes = 2
  task.check_training()


def test_an_evaluator_on_a_mesh_without_the_data_axis_is_refused(monkeypatch):
  """The batch is split along the axis `data`: a mesh of one's own named otherwise failed in
  jax ("Resource axis: data of P('data',) is not found in mesh"), after the val data was opened."""

  def open_data(*_):
    raise AssertionError("the val data was opened")

  monkeypatch.setattr(data, "create_dataset", open_data)
  task = tasks.get(demo.get_config())
  model = task.create_model()[0]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
  expected = (
      "the mesh's axes are ('batch',); expected an axis 'data', along which the batch is split: "
      "fec_jax.training.create_mesh(), or Mesh(devices, ('data',))"
  )
  with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
    task.evaluator(model, mesh)
  with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):  # a task of one's own's
    tasks.BatchEvaluator([], 0, lambda *_: {}, lambda *_: {}, mesh, None)


def test_a_seed_is_a_32_bit_int():
  """jax.random.key keeps a seed's low 32 bits (x64 off): 2**32 and 2**40 gave seed 0's weights,
  and 2**64 an OverflowError after the compile. The accepted seeds give distinct keys."""
  key = lambda seed: tuple(np.asarray(jax.random.key_data(jax.random.key(seed))).tolist())
  accepted = (-(2**31), -1, 0, 1, 2**31 - 1)
  assert len({key(s) for s in accepted}) == len(accepted)
  c = demo.get_config()
  for seed in accepted:
    c.seed = seed
    training.check_config(c)
  for seed, same_as in ((2**31, -(2**31)), (2**32 - 1, -1), (2**32, 0), (2**40, 0), (2**64, None)):
    assert same_as is None or key(seed) == key(same_as)
    c.seed = seed
    with pytest.raises(ValueError) as e:
      training.check_config(c)
    assert str(e.value) == (
        "config.seed must be in [-2147483648, 2147483647] (jax.random.key keeps 32 bits: any "
        f"other seed repeats one of these), got {seed}"
    )


@pytest.mark.parametrize("name", sorted(p.stem for p in pathlib.Path(REPO, "configs").glob("*.py")))
def test_a_misspelt_config_field_fails_in_python_too(name, tmp_path):
  """The configs are locked, so a typo in a script that calls the library fails at once (on the
  command line, config_flags locks them)."""
  module = importlib.import_module(f"configs.{name}")
  if name == "workdir":  # the config a run started with: the demo's, written as train.py does
    reporting.write_config(str(tmp_path), demo.get_config())
    c = module.get_config(str(tmp_path))
  else:
    c = module.get_config()
  with pytest.raises(AttributeError, match="max_step"):
    c.max_step = 3
  with pytest.raises(AttributeError, match="drop_path"):
    c.model.drop_path = 0.2
  with pytest.raises(AttributeError, match="num_clases"):
    c.data.num_clases = 1  # the derived configs replace config.data after fec_small locks it


def test_throughput_restarts_its_clock_after_an_evaluation(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(reporting.time, "perf_counter", lambda: now[0])
  clock = reporting.Throughput(1, 101, global_batch_size=10)
  now[0] = 1.0
  assert clock.update(11) == (100.0, 9.0)  # 10 steps of 10 images in 1 s; 90 steps left
  now[0] = 6.0  # a 5 s evaluation
  clock.restart()
  now[0] = 7.0
  assert clock.update(21) == (100.0, 8.0)  # the evaluation's 5 s are not in the rate


def test_read_metrics_leaves_out_a_record_cut_off_by_a_kill(tmp_path):
  path = tmp_path / reporting.METRICS_FILE
  path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_lo')
  assert reporting.read_metrics(str(tmp_path)) == [{"step": 1, "train_loss": 2.0}]
  writer = reporting.MetricsWriter(str(tmp_path), resume_step=1)  # a resume at step 1
  writer.close()
  assert path.read_text() == '{"step": 1, "train_loss": 2.0}\n'
  path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match="metrics.jsonl line 2 is not a JSON record"):
    reporting.read_metrics(str(tmp_path))


def test_the_classification_evaluator_takes_classifiers_only():
  mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  with pytest.raises(ValueError, match="holds fec_small_seg, not a classifier"):
    tasks.get(demo.get_config()).evaluator(fec_jax.create_model("fec_small_seg"), mesh)


@pytest.mark.parametrize("val_loss", [True, False])
def test_curves_legend_names_only_the_losses_recorded(tmp_path, monkeypatch, val_loss):
  """curves.png's loss panel has a "val" entry where the evaluations gave a loss (a classifier's),
  and an "EMA val" one with EMA (ema_val_loss was plotted nowhere), none for a segmenter's (mIoU,
  mAcc, aAcc only)."""
  import matplotlib.figure

  records = [
      {"step": 10, "train_loss": 0.4, "lr": 1e-3, "val_mIoU": 75.0, "val_images": 3},
      {"step": 20, "train_loss": 0.2, "lr": 1e-4, "val_mIoU": 80.0, "val_images": 3},
  ]
  if val_loss:
    for r in records:
      r["val_loss"], r["ema_val_loss"] = r["train_loss"] + 0.1, r["train_loss"] + 0.2
  (tmp_path / reporting.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
  figures = []
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
  reporting.plot_metrics(str(tmp_path))
  loss, _, held_out = figures[0].axes
  labels = ["train", "val", "EMA val"] if val_loss else ["train"]
  assert loss.get_legend_handles_labels()[1] == labels
  assert held_out.get_legend_handles_labels()[1] == ["val_mIoU"]
