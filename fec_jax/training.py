"""Task-neutral training pieces: the data-parallel mesh, the official optimizer and schedule,
EMA, the train state and the jitted train step. The loop that uses them is fec_jax.loop; what is
specific to a task (model, augmentation, loss, metrics) comes from fec_jax.tasks.

Sec. N below is docs/official-code.md; Sec. 8 is the official training recipe.
Sharding: one mesh axis `data` over all devices (of all hosts). Batches are sharded along it,
params, model state (e.g. BatchNorm statistics), optimizer state and EMA are replicated; XLA
inserts the gradient all-reduce.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fec_jax import reporting
from fec_jax.model import FAST_COMPILE, block_axis, count_params

DATA_AXIS = "data"
DTYPES = ("float32", "bfloat16", "float16")

# (params, model_state, batch, key) -> (loss, new model_state): a task's training objective for
# one global batch; model_state holds the model's non-param collections (e.g. batch_stats).
LossFn = Callable[[Any, dict, dict, jax.Array], tuple[jax.Array, dict]]


# ----------------------------------------------------------------------------- mesh / sharding


def create_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, axis `data`."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_mesh(mesh: Mesh) -> None:
  """ValueError unless `mesh` has the axis `data` (create_mesh's), along which the batch is split:
  a mesh built in Python for an evaluator may name it otherwise."""
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(
        f"the mesh's axes are {mesh.axis_names}; expected an axis {DATA_AXIS!r}, along which "
        f"the batch is split: fec_jax.training.create_mesh(), or Mesh(devices, ({DATA_AXIS!r},))"
    )


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's slice of the batch (numpy, [B / processes, ...]) -> global arrays [B, ...]."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


# ----------------------------------------------------------------------------- schedule


def scaled_lr(base_lr: float, global_batch_size: int, base_batch_size: int = 1024) -> float:
  """The linear scaling rule: lr = base_lr * batch / base_batch_size (1024 in the ImageNet
  configs). fec-jax's: the released script takes its lr (1e-3 at batch 1024) as given
  (docs/official-code.md Sec. 8), which this equals at 1024. base_batch_size 0 = no scaling
  (base_lr is the lr at any batch, as mmseg's configs)."""
  return base_lr * global_batch_size / base_batch_size if base_batch_size else base_lr


def peak_lr(config) -> float:
  """The schedule's peak: config.base_lr scaled by global_batch_size / lr_base_batch_size."""
  base = config.lr_base_batch_size
  return scaled_lr(config.base_lr, config.global_batch_size, base)


def lr_warning(config) -> str | None:
  """What is wrong with a peak lr that the schedule cannot decay much toward min_lr (a small
  batch under the linear scaling rule, e.g. configs/finetune.py at batch 16); None if nothing."""
  peak = peak_lr(config)
  if peak >= 2 * config.min_lr:
    return None
  scaled = (
      f"base_lr x global_batch_size / {config.lr_base_batch_size}"
      if config.lr_base_batch_size
      else "base_lr: lr_base_batch_size is 0"
  )
  if peak < config.min_lr:
    problem = "is below min_lr {:.3g}: the schedule rises toward min_lr instead of decaying"
  else:
    problem = "is less than twice min_lr {:.3g}: the schedule hardly changes it"
  return (
      f"the peak lr {peak:.3g} ({scaled}) {problem.format(config.min_lr)}; raise base_lr "
      "(for a small batch: --config.lr_base_batch_size=0, base_lr unscaled) or lower min_lr"
  )


def epoch_lr(epoch, peak: float, warmup_epochs: int, epochs: int, warmup_lr: float, min_lr: float):
  """timm CosineLRScheduler, stepped once per epoch (Sec. 8).

  epoch < warmup: warmup_lr + epoch * (peak - warmup_lr) / warmup_epochs;
  epoch < epochs: min_lr + 0.5 (peak - min_lr)(1 + cos(pi epoch / epochs)), the cosine clock
  counting from epoch 0; afterwards (the cooldown epochs): min_lr.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  warm = warmup_lr + epoch * (peak - warmup_lr) / max(warmup_epochs, 1)
  cosine = min_lr + 0.5 * (peak - min_lr) * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
  return jnp.where(epoch < warmup_epochs, warm, jnp.where(epoch < epochs, cosine, min_lr))


def poly_lr(step, peak: float, total: int, power: float, min_lr: float):
  """mmcv's PolyLrUpdaterHook with by_epoch=False (the segmentation recipe): before iteration
  `step` (0-based) lr = (peak - min_lr) * (1 - step / total) ** power + min_lr."""
  remaining = (total - jnp.minimum(step, total)).astype(jnp.float32) / total  # exact near the end
  return (peak - min_lr) * remaining**power + min_lr


LR_SCHEDULES = ("cosine_epochs", "poly")


def lr_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """step -> lr. 'cosine_epochs': constant within an epoch (the official ImageNet script sets
  the lr once per epoch); 'poly': per iteration over config.schedule_steps."""
  peak = peak_lr(config)
  if config.lr_schedule == "poly":
    total, power = config.schedule_steps, config.poly_power
    return lambda step: poly_lr(step, peak, total, power, config.min_lr)
  return lambda step: epoch_lr(
      step // steps_per_epoch,
      peak,
      config.warmup_epochs,
      config.epochs,
      config.warmup_lr,
      config.min_lr,
  )


def schedule_end(config, steps_per_epoch: int) -> int:
  """Steps of the whole recipe ('cosine_epochs': epochs + cooldown; 'poly':
  config.schedule_steps): a run does not go past them."""
  if config.lr_schedule == "poly":
    return config.schedule_steps
  return (config.epochs + config.cooldown_epochs) * steps_per_epoch


def total_steps(config, steps_per_epoch: int) -> int:
  """The steps of schedule_end, or config.max_steps when set (> 0) and shorter."""
  full = schedule_end(config, steps_per_epoch)
  return min(full, config.max_steps) if config.max_steps > 0 else full


def max_steps_warning(config, steps_per_epoch: int) -> str | None:
  """What keeps the run from reaching config.max_steps: the end of its schedule
  (schedule_end), where the run stops; None where max_steps is not past it."""
  end = schedule_end(config, steps_per_epoch)
  if config.max_steps <= end:
    return None
  if config.lr_schedule == "poly":
    length, field = "schedule_steps", "schedule_steps"
  else:
    length = (
        f"(epochs {config.epochs} + cooldown_epochs {config.cooldown_epochs}) x "
        f"{steps_per_epoch} steps per epoch"
    )
    field = "epochs"
  return (
      f"config.max_steps {config.max_steps} is past the end of the schedule, step {end} "
      f"({length}): the run stops there; to train longer, raise config.{field} (in a new "
      "workdir: a resume keeps its run's schedule; --config.init_from=DIR starts from its weights)"
  )


def eval_due(config, step: int, steps_per_epoch: int) -> bool:
  """Whether the periodic evaluation runs after `step` steps: every config.eval_every_steps
  steps when that is > 0, else at the end of every config.eval_every_epochs-th epoch."""
  every = config.eval_every_steps
  if every > 0:
    return step % every == 0
  return step % steps_per_epoch == 0 and (step // steps_per_epoch) % config.eval_every_epochs == 0


# ----------------------------------------------------------------------------- optimizer


WEIGHT_DECAY_ON = ("matrices", "all")


def weight_decay_mask(params, weight_decay_on: str = "matrices") -> Any:
  """Which params weight decay touches. 'matrices': timm's param_groups_weight_decay, no decay
  for 1-D params (norms, layer scales, sim_alpha/beta) and biases (all 1-D here), conv and dense
  kernels decay; 'all': every param (mmcv's DefaultOptimizerConstructor without paramwise_cfg).
  A stage's params are stacked per block (fec_jax.model.block_axis), so their leading axis does
  not count.

  In neither does ClusterPool's `conv_f` decay: it only feeds the argmax, so it gets no gradient
  (docs/official-code.md Sec. 4), its `.grad` stays None in the official training (DDP with
  find_unused_parameters=True leaves a parameter that no rank used untouched), and torch's
  AdamW skips such a parameter, weight decay included. The official runs never change it. (Under
  assign_grad="straight_through", an fec-jax extension train.py does not use, conv_f does get a
  gradient; it is still left out of weight decay.)"""

  def decays(path, p):
    names = [k.key for k in path]
    if "conv_f" in names:
      return False
    return weight_decay_on == "all" or p.ndim - block_axis(names) > 1

  return jax.tree_util.tree_map_with_path(decays, params)


def frozen_pattern(config) -> str:
  """config.frozen; '' (nothing frozen) for a config without the field (one built by hand)."""
  return config.get("frozen", "")


def frozen_mask(params, pattern: str) -> Any:
  """Which params config.frozen (`pattern`, a regular expression) freezes: those whose
  '/'-joined path (e.g. 'network_0/mlp/fc1/kernel', 'head/kernel'; a segmenter's
  'backbone/network_0/...', 'neck/...', 'decode_head/...') it matches from the start, as
  re.match: 'network_0/' takes a subtree, 'head' does not take 'decode_head/...', and
  '(?!head/)' takes all but the head. '' freezes nothing."""
  regex = re.compile(pattern) if pattern else None
  return jax.tree_util.tree_map_with_path(
      lambda path, _: regex is not None and regex.match(_path(path)) is not None, params
  )


def _path(path) -> str:
  return "/".join(k.key for k in path)


def check_frozen(params, pattern: str) -> str | None:
  """The line a run logs about what `pattern` (config.frozen) freezes in `params` (arrays or
  ShapeDtypeStructs): the counts of arrays and of parameters frozen and trained; None for ''.
  ValueError where the pattern freezes no param or every param."""
  if not pattern:
    return None
  leaves = jax.tree_util.tree_leaves_with_path(params)
  frozen = jax.tree.leaves(frozen_mask(params, pattern))
  arrays = {f: [a for (_, a), g in zip(leaves, frozen) if g == f] for f in (True, False)}
  if not arrays[True] or not arrays[False]:
    starts = sorted({_path(path[:1]) + "/" for path, _ in leaves})
    examples = (
        "'backbone/' freezes the backbone, 'backbone/(patch_embed|network_0)/' its stem and "
        "first stage"
        if "backbone/" in starts
        else "'(?!head/)' freezes all but the head, 'patch_embed/|network_0/' the stem and first "
        "stage"
    )
    raise ValueError(
        f"config.frozen {pattern!r} matches {'no' if not arrays[True] else 'every'} param: it "
        "is matched at the start of each param's path (re.match), and the paths start with "
        f"{', '.join(starts)}; e.g. {examples}"
    )
  count = lambda frozen: (
      f"{reporting.counted(len(arrays[frozen]), 'array')} "
      f"({count_params(arrays[frozen]):,} parameters)"
  )
  return f"config.frozen {pattern!r}: {count(True)} frozen, {count(False)} trained"


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW (config.b1, b2, eps: officially 0.9, 0.999, 1e-8) after optional global-norm clipping
  (timm --clip-grad, mode 'norm'), weight decay on weight_decay_mask(params,
  config.weight_decay_on). With config.frozen, the params of frozen_mask go to
  optax.set_to_zero instead (optax.multi_transform): no update, no weight decay, no moments in
  the optimizer state, and no part in the clipping's global norm; config.frozen '' keeps the
  optimizer (and the state's layout) of a run without it."""
  adamw = optax.adamw(
      schedule,
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
      mask=lambda params: weight_decay_mask(params, config.weight_decay_on),
  )
  if config.grad_clip_norm > 0:
    adamw = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
  pattern = frozen_pattern(config)
  if not pattern:
    return adamw
  labels = lambda params: jax.tree.map(
      lambda frozen: "frozen" if frozen else "trained", frozen_mask(params, pattern)
  )
  return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, labels)


def ema_update(ema_params, params, decay: float, frozen=None):
  """timm ModelEmaV2: ema = decay * ema + (1 - decay) * params, every step, no bias correction.
  frozen: a tree of bools (frozen_mask) over params whose EMA is kept as it is (it equals the
  param, which does not change; the formula could move it in the last bit)."""
  if frozen is None:
    frozen = jax.tree.map(lambda _: False, params)
  return jax.tree.map(
      lambda e, p, f: e if f else decay * e + (1.0 - decay) * p, ema_params, params, frozen
  )


# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  model_state: dict  # the model's other variable collections (e.g. batch_stats); {} for FEC
  opt_state: Any
  ema_params: Any  # None when config.ema_decay == 0
  rng: jax.Array  # uint32 key data; step keys are fold_in(rng, step)

  def variables(self, ema: bool = False) -> dict:
    """{'params': params or EMA params, **model_state}, what model.apply takes."""
    return {"params": self.ema_params if ema else self.params, **self.model_state}


def init_state(model, tx, config, input_shape: tuple[int, ...]) -> TrainState:
  """Initial state from config.seed (run under jit with replicated out_shardings)."""
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  variables = dict(model.init(init_key, jnp.zeros(input_shape, jnp.float32)))
  params = variables.pop("params")  # the rest: other collections (init leaves out intermediates)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      model_state=variables,
      opt_state=tx.init(params),
      ema_params=params if config.ema_decay > 0 else None,
      rng=jax.random.key_data(train_key),
  )


def abstract_state(model, tx, config, input_shape: tuple[int, ...], mesh: Mesh) -> TrainState:
  """The train state's shapes and dtypes, replicated on the mesh, computed without running
  anything (a restore target, and the shardings of the train step)."""
  shapes = jax.eval_shape(lambda: init_state(model, tx, config, input_shape))
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), shapes
  )


def create_state(model, tx, config, input_shape: tuple[int, ...], shardings) -> TrainState:
  """init_state run once with the given state shardings (those of abstract_state), compiled
  without XLA's backend optimizations (as fec_jax.init_variables: the fully optimized CPU
  compile of init takes ~4x longer)."""
  init = jax.jit(lambda: init_state(model, tx, config, input_shape), out_shardings=shardings)
  return init.lower().compile(compiler_options=FAST_COMPILE)()


# ----------------------------------------------------------------------------- step


def make_train_step(loss_fn: LossFn, tx, schedule, config, mesh: Mesh, state_sharding) -> Callable:
  """jit(state, batch) -> (state, metrics): one optimizer step on the task's loss_fn.

  batch: the train loader's global batch, sharded on `data`; metrics {'loss', 'lr',
  'grad_norm'}: replicated fp32 scalars. The step key fold_in(rng, step) is the task's to split
  (augmentation, dropout), so a resumed run draws exactly what the uninterrupted one drew.
  Only the params that config.frozen leaves trained are differentiated (a frozen param's
  gradient is 0, and grad_norm that of the trained ones).
  """

  pattern = frozen_pattern(config)

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    frozen = frozen_mask(state.params, pattern)
    # No gradient is computed for a frozen param (nor backpropagated where only frozen params
    # need it): its gradient is 0.
    unfrozen = lambda params: jax.tree.map(
        lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen
    )
    objective = lambda params: loss_fn(unfrozen(params), state.model_state, batch, key)
    (loss, model_state), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A frozen param is kept as it is: its update is 0, but -0.0 + 0 would be +0.0.
    params = jax.tree.map(lambda new, old, f: old if f else new, params, state.params, frozen)
    ema = (
        None
        if state.ema_params is None
        else ema_update(state.ema_params, params, config.ema_decay, frozen)
    )
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
    return (
        state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            ema_params=ema,
        ),
        metrics,
    )

  return jax.jit(
      train_step,
      in_shardings=(state_sharding, batch_sharded(mesh)),
      out_shardings=(state_sharding, replicated(mesh)),
  )


# ----------------------------------------------------------------------------- config checks


def check_compute(config, batch_fields=("global_batch_size", "eval_batch_size")) -> None:
  """config.model.dtype is a compute dtype, and each of `batch_fields` (eval.py: only
  eval_batch_size) a positive multiple of the device count."""
  if config.model.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {DTYPES}, got {config.model.dtype!r}")
  for field in batch_fields:
    if config[field] <= 0 or config[field] % jax.device_count():
      raise ValueError(
          f"config.{field} {config[field]} must be a positive multiple of the "
          f"{jax.device_count()} devices"
      )


def check_config(config, batched_evaluation: bool = True) -> None:
  """The task-neutral checks: fails before anything slow when the config cannot run on these
  devices (the task checks its own fields, Task.check_config). batched_evaluation: the task's
  Task.BATCHED_EVALUATION (False: eval_batch_size is not checked, as the evaluator does not read
  it)."""
  eval_batch = ("eval_batch_size",) if batched_evaluation else ()
  check_compute(config, ("global_batch_size", *eval_batch))
  schedule = config.lr_schedule
  if schedule not in LR_SCHEDULES:
    raise ValueError(f"config.lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
  if schedule == "poly" and config.schedule_steps <= 0:
    raise ValueError(
        f"config.schedule_steps must be > 0 for the poly schedule, got {config.schedule_steps}"
    )
  cosine = schedule == "cosine_epochs"
  if cosine and not (0 <= config.warmup_epochs <= config.epochs and config.epochs > 0):
    raise ValueError(
        "config: need 0 <= warmup_epochs <= epochs and epochs > 0, got warmup_epochs "
        f"{config.warmup_epochs}, epochs {config.epochs}"
    )
  if not 0 <= config.ema_decay < 1:
    raise ValueError(f"config.ema_decay must be in [0, 1) (0: no EMA), got {config.ema_decay}")
  if config.init_from_ema and not config.init_from:
    raise ValueError(
        "config.init_from_ema takes the EMA weights of config.init_from, which is not set"
    )
  if config.init_from_step != -1 and not (config.init_from and config.init_from_step >= 0):
    raise ValueError(
        "config.init_from_step is a saved step of config.init_from (-1: its latest), got "
        f"{config.init_from_step}{'' if config.init_from else ' without init_from'}"
    )
  try:
    re.compile(frozen_pattern(config))
  except re.error as e:
    raise ValueError(
        f"config.frozen {frozen_pattern(config)!r} is not a regular expression ({e}); expected "
        "one that matches the start of the paths of the params to freeze, e.g. 'network_0/' "
        "or '(?!head/)'"
    ) from None
  if config.weight_decay_on not in WEIGHT_DECAY_ON:
    raise ValueError(
        f"config.weight_decay_on must be one of {WEIGHT_DECAY_ON}, got "
        f"{config.weight_decay_on!r}"
    )
  ranges = {  # field: (test, what it must be): the message names the field and its value
      "cooldown_epochs": (lambda v: v >= 0, ">= 0"),
      "max_steps": (lambda v: v >= 0, ">= 0 (0: the schedule's end)"),
      "lr_base_batch_size": (lambda v: v >= 0, ">= 0 (0: base_lr unscaled)"),
      "eval_every_steps": (lambda v: v >= 0, ">= 0 (0: every eval_every_epochs epochs)"),
      "base_lr": (lambda v: v > 0, "> 0"),
      "warmup_lr": (lambda v: v >= 0, ">= 0"),
      "min_lr": (lambda v: v >= 0, ">= 0"),
      "poly_power": (lambda v: v > 0, "> 0"),
      "weight_decay": (lambda v: v >= 0, ">= 0"),
      "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
      "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
      "eps": (lambda v: v > 0, "> 0"),
      "grad_clip_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
      "model.drop_path_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
      # jax.random.key keeps a seed's low 32 bits (x64 off): 2**32 gave seed 0's run, 2**64 an
      # OverflowError after the compile; the data's shuffle takes seed % 2**32 too
      "seed": (
          lambda v: -(2**31) <= v < 2**31,
          f"in [{-(2**31)}, {2**31 - 1}] (jax.random.key keeps 32 bits: any other seed repeats "
          "one of these)",
      ),
  }
  for field, (ok, expected) in ranges.items():
    value = config
    for part in field.split("."):
      value = value[part]
    if not ok(value):
      raise ValueError(f"config.{field} must be {expected}, got {value}")
  for field in (
      "log_every_steps",
      "checkpoint_every_steps",
      "keep_checkpoints",
      "eval_every_epochs",
  ):
    if config[field] <= 0:
      raise ValueError(f"config.{field} must be > 0, got {config[field]}")
