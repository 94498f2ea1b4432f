"""Training pieces for train.py / eval.py: the official optimizer and schedule, EMA, the
data-parallel mesh and the jitted train / eval steps.

"Reference" below is official-fec-reference.md; Sec. 8 is the official training recipe.
Sharding: one mesh axis `data` over all devices (of all hosts). Batches are sharded along it,
params, optimizer state and EMA are replicated; XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fec_jax.data import device_transforms, mixup

DATA_AXIS = "data"


# ----------------------------------------------------------------------------- mesh / sharding

def create_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, axis `data`."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's slice of the batch (numpy, [B / processes, ...]) -> global arrays [B, ...]."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


# ----------------------------------------------------------------------------- schedule

def scaled_lr(base_lr: float, global_batch_size: int, base_batch_size: int = 1024) -> float:
  """Linear scaling rule of the official script: lr = base_lr * batch / 1024 (Sec. 8)."""
  return base_lr * global_batch_size / base_batch_size


def epoch_lr(epoch, peak_lr: float, warmup_epochs: int, epochs: int, warmup_lr: float,
             min_lr: float):
  """timm CosineLRScheduler, stepped once per epoch (Sec. 8).

  epoch < warmup: warmup_lr + epoch * (peak - warmup_lr) / warmup_epochs;
  epoch < epochs: min_lr + 0.5 (peak - min_lr)(1 + cos(pi epoch / epochs)), the cosine clock
  counting from epoch 0; afterwards (the cooldown epochs): min_lr.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  warm = warmup_lr + epoch * (peak_lr - warmup_lr) / max(warmup_epochs, 1)
  cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  return jnp.where(epoch < warmup_epochs, warm, jnp.where(epoch < epochs, cosine, min_lr))


def lr_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """step -> lr, constant within an epoch (the official script sets the lr once per epoch)."""
  peak = scaled_lr(config.base_lr, config.global_batch_size)
  return lambda step: epoch_lr(step // steps_per_epoch, peak, config.warmup_epochs, config.epochs,
                               config.warmup_lr, config.min_lr)


def total_steps(config, steps_per_epoch: int) -> int:
  """Steps of the whole recipe (epochs + cooldown), or config.max_steps when set (> 0)."""
  full = (config.epochs + config.cooldown_epochs) * steps_per_epoch
  return min(full, config.max_steps) if config.max_steps > 0 else full


# ----------------------------------------------------------------------------- optimizer

def weight_decay_mask(params) -> Any:
  """timm's param_groups_weight_decay: no decay for 1-D params (norms, layer scales,
  sim_alpha/beta) and biases (all 1-D here); conv and dense kernels decay."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW (betas 0.9/0.999, eps 1e-8, wd 0.05 on the mask) after optional global-norm
  clipping (timm --clip-grad, mode 'norm')."""
  adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay, mask=weight_decay_mask)
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
  return adamw


def ema_update(ema_params, params, decay: float):
  """timm ModelEmaV2: ema = decay * ema + (1 - decay) * params, every step, no bias correction."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


# ----------------------------------------------------------------------------- state

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  ema_params: Any  # None when config.ema_decay == 0
  rng: jax.Array  # uint32 key data; step keys are fold_in(rng, step)


def init_state(model, tx, config, image_size: int) -> TrainState:
  """Initial state from config.seed (run under jit with replicated out_shardings)."""
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  params = model.init(init_key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params if config.ema_decay > 0 else None,
                    rng=jax.random.key_data(train_key))


def abstract_state(model, tx, config, mesh: Mesh) -> TrainState:
  """The train state's shapes and dtypes, replicated on the mesh, computed without running
  anything (a restore target, and the shardings of the train step)."""
  shapes = jax.eval_shape(lambda: init_state(model, tx, config, config.data.image_size))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)),
                      shapes)


def create_state(model, tx, config, shardings) -> TrainState:
  """init_state run once with the given state shardings (those of abstract_state), compiled
  without XLA's backend optimizations (as fec_jax.init_variables: the fully optimized CPU
  compile of init takes ~4x longer)."""
  init = jax.jit(lambda: init_state(model, tx, config, config.data.image_size),
                 out_shardings=shardings)
  return init.lower().compile(compiler_options={"xla_backend_optimization_level": 0})()


# ----------------------------------------------------------------------------- steps

def soft_target_cross_entropy(logits, targets):
  """timm SoftTargetCrossEntropy: mean over the batch of -sum(t * log_softmax(logits)), fp32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def per_device_augment(data_config, mesh: Mesh) -> Callable:
  """(key, images uint8 [B,S,S,3], erase boxes [B,4], labels [B]) -> (images f32, soft targets
  [B, K]): the device part of the recipe in timm's order (normalize, erasing fill,
  Mixup/CutMix), drawn separately on each device's shard (Mixup partner = that shard
  reversed), as the official per-GPU pipeline does; the key is folded with the device's
  position on the `data` axis."""
  d = data_config

  def augment(key, images, boxes, labels):  # [B / devices, ...]
    erase_key, mix_key = jax.random.split(jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS)))
    x = device_transforms.normalize(images, d.mean, d.std)
    if d.reprob > 0:
      x = device_transforms.erase(erase_key, x, boxes, d.remode)
    return mixup.mixup_cutmix(mix_key, x, labels, d.num_classes, mixup_alpha=d.mixup_alpha,
                              cutmix_alpha=d.cutmix_alpha, prob=d.mixup_prob,
                              switch_prob=d.mixup_switch_prob,
                              label_smoothing=d.label_smoothing)

  data = P(DATA_AXIS)
  return jax.shard_map(augment, mesh=mesh, in_specs=(P(), data, data, data),
                       out_specs=(data, data))


def make_train_step(model, tx, schedule, config, mesh: Mesh, state_sharding) -> Callable:
  """jit(state, batch) -> (state, metrics); batch {'image' [B,S,S,3] uint8, 'erase' [B,4] i32,
  'label' [B] i32} (the train loader's batches) sharded on `data`; metrics {'loss', 'lr',
  'grad_norm'} replicated fp32 scalars."""
  augment = per_device_augment(config.data, mesh)

  def step_fn(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    augment_key, drop_key = jax.random.split(key)
    images, targets = augment(augment_key, batch["image"], batch["erase"], batch["label"])

    def loss_fn(params):
      logits = model.apply({"params": params}, images, train=True, rngs={"dropout": drop_key})
      return soft_target_cross_entropy(logits, targets)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = (None if state.ema_params is None
           else ema_update(state.ema_params, params, config.ema_decay))
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics

  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharded(mesh)),
                 out_shardings=(state_sharding, replicated(mesh)))


def eval_sums(logits, labels, mask):
  """Sums over the real examples of a val batch: loss (hard-label CE), top-1, top-5 hits, count."""
  logits = logits.astype(jnp.float32)
  weight = mask.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]  # [B, 5]
  hit1 = (top5[:, 0] == labels).astype(jnp.float32)
  hit5 = jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.float32)
  return {"loss": jnp.sum(loss * weight), "top1": jnp.sum(hit1 * weight),
          "top5": jnp.sum(hit5 * weight), "count": jnp.sum(weight)}


def make_eval_step(model, data_config, mesh: Mesh) -> Callable:
  """jit(params, batch) -> sums (eval_sums) over the global batch, replicated; batch
  {'image' [B,S,S,3] uint8, 'label', 'mask'} (the val loader's batches), normalized here."""
  def step_fn(params, batch):
    images = device_transforms.normalize(batch["image"], data_config.mean, data_config.std)
    logits = model.apply({"params": params}, images, train=False)
    return eval_sums(logits, batch["label"], batch["mask"])

  return jax.jit(step_fn, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                 out_shardings=replicated(mesh))


def evaluate(eval_step, params, batches, mesh: Mesh) -> dict[str, float]:
  """Runs eval_step over host-local val batches; returns {'loss', 'top1', 'top5'} (top-k in %)."""
  totals = None
  for local in batches:
    sums = eval_step(params, global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  n = max(float(totals["count"]), 1.0)
  return {"loss": float(totals["loss"]) / n, "top1": 100.0 * float(totals["top1"]) / n,
          "top5": 100.0 * float(totals["top5"]) / n}



# ----------------------------------------------------------------------------- config checks

def check_config(config) -> None:
  """Fails before any compilation when the config cannot run on these devices and data."""
  from fec_jax.model import VARIANTS  # the variant table, for the classification names
  name, size = config.model.name, config.data.image_size
  if name not in VARIANTS or VARIANTS[name].dense_outputs:
    classifiers = sorted(n for n, v in VARIANTS.items() if not v.dense_outputs)
    raise ValueError(f"config.model.name {name!r} is not a classification variant; "
                     f"choose one of {classifiers}")
  if size % 32:
    raise ValueError(f"config.data.image_size {size} must be a multiple of 32 (every ClusterPool "
                     "needs an even feature map: the maps are size/4, /8, /16, /32)")
  if config.model.dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.model.dtype must be float32, bfloat16 or float16, got "
                     f"{config.model.dtype!r}")
  for field in ("global_batch_size", "eval_batch_size"):
    if config[field] % jax.device_count():
      raise ValueError(f"config.{field} {config[field]} is not divisible by the "
                       f"{jax.device_count()} devices")
  if config.warmup_epochs > config.epochs or config.epochs <= 0:
    raise ValueError("need 0 <= warmup_epochs <= epochs and epochs > 0")
