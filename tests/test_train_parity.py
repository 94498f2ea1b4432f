"""Training parity with the PyTorch reference (issue 3, item 9).

From identical weights and batches (uint8 images that our step normalizes on device and the
reference gets normalized; no augmentation, no dropout, float32), 20 steps of our
train step (optax AdamW + weight-decay mask + per-epoch warmup/cosine/cooldown schedule) and of
the PyTorch reference model trained with torch.optim.AdamW on timm's parameter groups, with the
lr set once per epoch as timm's CosineLRScheduler does, give the same per-step losses.
"""

import math

import jax
import ml_collections
import numpy as np
import torch

from fec_jax import convert, create_model, data, training
from fec_jax.tasks.classification import Classification
from tests.torch_reference import create_torch_model

STEPS, STEPS_PER_EPOCH, BATCH, SIZE, CLASSES = 20, 2, 8, 32, 10


def parity_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = data.demo_config()  # no Mixup/CutMix, no label smoothing
  c.global_batch_size = BATCH
  c.base_lr = 0.128  # -> peak lr 1e-3 at batch 8 (linear scaling)
  c.b1, c.b2, c.eps, c.weight_decay, c.grad_clip_norm = 0.9, 0.999, 1e-8, 0.05, 1.0
  c.epochs, c.warmup_epochs, c.cooldown_epochs = 8, 2, 2  # 20 steps: warmup, cosine, cooldown
  c.warmup_lr, c.min_lr = 1e-6, 1e-6
  c.lr_schedule, c.lr_base_batch_size, c.weight_decay_on = "cosine_epochs", 1024, "matrices"
  c.ema_decay = 0.0
  return c


def normalized(images, data_config):
  """torchvision ToTensor + Normalize, in numpy: uint8 [B, H, W, 3] -> float32."""
  mean, std = np.float32(data_config.mean), np.float32(data_config.std)
  return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def timm_epoch_lr(epoch: int, c) -> float:
  """timm CosineLRScheduler(t_initial=epochs, warmup_t, warmup_lr_init, lr_min), per epoch."""
  peak = c.base_lr * c.global_batch_size / 1024
  if epoch < c.warmup_epochs:
    return c.warmup_lr + epoch * (peak - c.warmup_lr) / c.warmup_epochs
  if epoch < c.epochs:
    return c.min_lr + 0.5 * (peak - c.min_lr) * (1 + math.cos(math.pi * epoch / c.epochs))
  return c.min_lr


def timm_param_groups(model, weight_decay: float):
  """timm.optim.param_groups_weight_decay: 1-D params and biases are not decayed."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
  return [
      {"params": no_decay, "weight_decay": 0.0},
      {"params": decay, "weight_decay": weight_decay},
  ]


def torch_losses(state_dict, batches, c) -> tuple[list[float], dict]:
  torch.manual_seed(0)
  model = create_torch_model("fec_small", num_classes=CLASSES)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
  model.train()
  opt = torch.optim.AdamW(
      timm_param_groups(model, c.weight_decay), lr=1.0, betas=(c.b1, c.b2), eps=c.eps
  )
  losses = []
  for step, (images, labels) in enumerate(batches):
    for group in opt.param_groups:
      group["lr"] = timm_epoch_lr(step // STEPS_PER_EPOCH, c)
    x = torch.from_numpy(normalized(images, c.data).transpose(0, 3, 1, 2).copy())
    loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels).long())
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip_norm)
    opt.step()
    losses.append(loss.item())
  unused = [n for n, p in model.named_parameters() if p.grad is None]
  assert sorted(unused) == sorted(
      f"network.{i}.conv_f.{p}" for i in (1, 3, 5) for p in ("weight", "bias")
  )
  return losses, {k: v.numpy() for k, v in model.state_dict().items()}


def jax_losses(params, batches, c) -> tuple[list[float], dict]:
  model = create_model("fec_small", num_classes=CLASSES)
  mesh = training.create_mesh()
  schedule = training.lr_schedule(c, STEPS_PER_EPOCH)
  tx = training.create_optimizer(c, schedule)
  state = training.TrainState(
      step=jax.numpy.zeros((), jax.numpy.int32),
      params=params,
      model_state={},
      opt_state=tx.init(params),
      ema_params=None,
      rng=jax.random.key_data(jax.random.key(0)),
  )
  sharding = jax.tree.map(lambda _: training.replicated(mesh), state)
  state = jax.device_put(state, sharding)
  loss_fn = Classification(c).loss_fn(model, mesh)
  step = training.make_train_step(loss_fn, tx, schedule, c, mesh, sharding)
  losses, lrs = [], []
  for images, labels in batches:
    batch = {"image": images, "erase": np.zeros((len(images), 4), np.int32), "label": labels}
    state, metrics = step(state, training.global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
    lrs.append(float(metrics["lr"]))
  np.testing.assert_allclose(
      lrs, [timm_epoch_lr(s // STEPS_PER_EPOCH, c) for s in range(STEPS)], rtol=1e-5
  )  # the schedule runs in float32
  return losses, jax.device_get(state.params)


def test_twenty_steps_match_torch_adamw_with_timm_groups():
  c = parity_config()
  rng = np.random.default_rng(0)
  distinct = [
      (
          rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
          rng.integers(0, CLASSES, BATCH).astype(np.int32),
      )
      for _ in range(2)
  ]
  batches = [distinct[i % 2] for i in range(STEPS)]  # cycled, so that the loss can fall
  torch.manual_seed(0)
  state_dict = {
      k: v.detach().numpy().copy()
      for k, v in create_torch_model("fec_small", num_classes=CLASSES).state_dict().items()
  }
  params, _ = convert.torch_to_flax(state_dict, "fec_small", num_classes=CLASSES)

  ours, our_params = jax_losses(jax.tree.map(jax.numpy.asarray, params), batches, c)
  ref, ref_state = torch_losses(state_dict, batches, c)
  rel = np.abs(np.array(ours) - np.array(ref)) / np.abs(np.array(ref))
  print("max relative loss difference over 20 steps:", rel.max())
  assert rel.max() < 1e-4, (ours, ref)
  assert ref[-2] < ref[0] and ref[-1] < ref[1]  # it learns: not two flat curves compared
  # conv_f gets no gradient, so torch's AdamW leaves it as it was, weight decay included
  trained, _ = convert.torch_to_flax(ref_state, "fec_small", num_classes=CLASSES)
  for i in (1, 3, 5):
    for p in ("kernel", "bias"):
      ours_p = our_params[f"network_{i}"]["conv_f"][p]
      np.testing.assert_array_equal(ours_p, params[f"network_{i}"]["conv_f"][p])
      np.testing.assert_array_equal(ours_p, trained[f"network_{i}"]["conv_f"][p])
