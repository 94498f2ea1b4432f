"""Small training runs shared by the training tests (tests/conftest.py's `reference` run)."""

import os

import grain
import jax
import jax.numpy as jnp

from configs import demo
from fec_jax import checkpoint, loop, reporting, training
from fec_jax.model import FAST_COMPILE  # XLA:CPU compiles ~3x faster

STEPS = 6


def tiny(**overrides):
  """The demo config cut to 6 steps at batch 8, float32, a record every step and a checkpoint
  every 2; overrides 'field' or 'section.field'."""
  c = demo.get_config()
  c.global_batch_size, c.eval_batch_size, c.model.dtype = 8, 120, "float32"
  c.max_steps, c.log_every_steps, c.checkpoint_every_steps, c.keep_checkpoints = STEPS, 1, 2, 2
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  return c


def train(config, workdir):
  return loop.train_and_evaluate(config, str(workdir), compiler_options=FAST_COMPILE)


def losses(workdir) -> list[float]:
  return [r["train_loss"] for r in reporting.read_metrics(str(workdir))]


def saved_steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(workdir) if d.isdigit())


def save_step_3(workdir, params, opt_state, model_name: str) -> training.TrainState:
  """Saves a TrainState of step 3 with these params and optimizer state (no EMA) as train.py
  does, with a data iterator one element in; returns the state."""
  state = training.TrainState(
      step=jnp.array(3, jnp.int32),
      params=params,
      model_state={},
      opt_state=opt_state,
      ema_params=None,
      rng=jax.random.key_data(jax.random.key(0)),
  )
  data_iter = iter(grain.MapDataset.range(8).to_iter_dataset())
  next(data_iter)
  with checkpoint.training_manager(workdir, keep=1) as mngr:
    checkpoint.save_training(mngr, state, model_name, {}, data_iter)
  return state
