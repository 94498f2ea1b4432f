"""Small training runs shared by the training tests (tests/conftest.py's `reference` run)."""

import os

from configs import demo
from fec_jax import loop, reporting
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
