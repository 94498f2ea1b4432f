r"""Trains FEC with the official recipe on a data-parallel mesh of all devices.

  python train.py --config=configs/fec_small.py --workdir=DIR [--config.field=value ...]

Running the same command again resumes from the latest checkpoint in DIR (params, optimizer
state, EMA, step, RNG and the data iterator), bit-identically on CPU. Multi-host: run one
process per host with --multihost (and, where jax cannot detect the cluster, the coordinator
flags); each host reads its own share of the data.
"""

import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from fec_jax import checkpoint, data, reporting, training
from fec_jax.model import create_model

config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard and plot go here.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (one process per host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multihost, optional).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multihost, optional).")
flags.DEFINE_integer("process_id", None, "This process's index (multihost, optional).")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def initialize_distributed() -> None:
  """Joins the multi-process job; CPU devices (tests, CPU clusters) talk through gloo."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def quiet_orbax() -> None:
  """Orbax logs every file it writes at INFO; keep its warnings only."""
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or "orbax" not in r.pathname)


def main(argv):
  del argv
  quiet_orbax()
  config, workdir = FLAGS.config, FLAGS.workdir
  if FLAGS.multihost:
    initialize_distributed()
  primary = jax.process_index() == 0
  batch = config.global_batch_size
  # Config and data first: a missing dataset or a config that does not fit the devices or the
  # data (e.g. num_classes) stops here with one message, before anything is compiled.
  try:
    training.check_config(config)
    steps_per_epoch = data.steps_per_epoch(config.data, batch, jax.process_count())
    train_iter = data.create_loader(config.data, "train", batch, config.seed,
                                    jax.process_index(), jax.process_count())
  except (ValueError, data.DataNotFoundError) as e:
    sys.exit(f"error: {e}")
  num_steps = training.total_steps(config, steps_per_epoch)

  mesh = training.create_mesh()
  overrides = dict(num_classes=config.data.num_classes, drop_path_rate=config.model.drop_path_rate)
  model = create_model(config.model.name, dtype=jnp.dtype(config.model.dtype), **overrides)
  schedule = training.lr_schedule(config, steps_per_epoch)
  tx = training.create_optimizer(config, schedule)
  abstract = training.abstract_state(model, tx, config, mesh)
  state_sharding = jax.tree.map(lambda a: a.sharding, abstract)

  mngr = checkpoint.training_manager(workdir, config.keep_checkpoints)
  resume = mngr.latest_step()
  if resume is None:
    state = training.create_state(model, tx, config, state_sharding)
  else:
    state = checkpoint.restore_training(mngr, abstract, train_iter, resume)
    logging.info("resumed at step %d from %s", resume, workdir)
  start = int(state.step)
  writer = reporting.MetricsWriter(workdir, start, active=primary)
  logging.info("%s on %d devices (%d processes): %d steps of %d per epoch, global batch %d, "
               "peak lr %.3g", config.model.name, jax.device_count(), jax.process_count(),
               num_steps, steps_per_epoch, batch,
               training.scaled_lr(config.base_lr, batch))

  train_step = training.make_train_step(model, tx, schedule, config, mesh, state_sharding)
  eval_step = training.make_eval_step(model, config.data, mesh)

  def evaluate(params) -> dict[str, float]:
    val = data.create_loader(config.data, "val", config.eval_batch_size, config.seed,
                             jax.process_index(), jax.process_count())
    return training.evaluate(eval_step, params, val, mesh)

  clock = reporting.Throughput(start, num_steps, batch)
  pending = []  # per-step metrics not yet fetched from the device
  for step in range(start + 1, num_steps + 1):  # `step` = optimizer steps done after this one
    state, metrics = train_step(state, training.global_batch(next(train_iter), mesh))
    pending.append(metrics)
    epoch = (step - 1) // steps_per_epoch
    end_of_epoch = step % steps_per_epoch == 0
    eval_now = step == num_steps or (end_of_epoch and (epoch + 1) % config.eval_every_epochs == 0)
    save_now = step == num_steps or step % config.checkpoint_every_steps == 0
    if not (eval_now or save_now or step % config.log_every_steps == 0):
      continue
    pending = jax.device_get(pending)
    losses = [float(m["loss"]) for m in pending]
    # A finite loss with a non-finite gradient would still poison the params: check both.
    bad = [i for i, m in enumerate(pending) if not np.isfinite([m["loss"], m["grad_norm"]]).all()]
    if bad:
      mngr.wait_until_finished()
      sys.exit(f"error: non-finite training loss ({losses[bad[0]]}, gradient norm "
               f"{float(pending[bad[0]]['grad_norm'])}) at step {step - len(pending) + bad[0] + 1}"
               f"; stopped, the last good checkpoint is step {mngr.latest_step()} in {workdir}")
    record = {"step": step, "epoch": epoch, "train_loss": float(np.mean(losses)),
              "lr": float(pending[-1]["lr"]), "grad_norm": float(pending[-1]["grad_norm"])}
    pending = []
    img_per_s, eta = clock.update(step)
    logging.info(reporting.progress_line(step, num_steps, epoch, record["train_loss"],
                                         record["lr"], img_per_s, eta))
    if eval_now:
      record.update({f"val_{k}": v for k, v in evaluate(state.params).items()})
      if state.ema_params is not None:
        record.update({f"ema_val_{k}": v for k, v in evaluate(state.ema_params).items()})
      logging.info("eval at step %d: %s", step,
                   ", ".join(f"{k} {v:.4f}" for k, v in record.items() if "val_" in k))
    # The record goes out before the checkpoint: a run killed in between resumes from an
    # earlier step and the writer drops the records after it, so none is lost or doubled.
    writer.write(record)
    if save_now:
      checkpoint.save_training(mngr, state, config.model.name, overrides, train_iter)

  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  if primary:
    logging.info("wrote %s", reporting.plot_metrics(workdir))


if __name__ == "__main__":
  app.run(main)
