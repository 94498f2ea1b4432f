r"""Trains an FEC model for the task of the config (classification by default) on a
data-parallel mesh of all devices: fec_jax.loop.train_and_evaluate.

  python train.py --config=configs/fec_small.py --workdir=DIR [--config.field=value ...]

Running the same command again resumes from the latest checkpoint in DIR (params, optimizer
state, EMA, step, RNG and the data iterator), bit-identically on CPU; without --config, a
workdir's run resumes with the config it started with (DIR/config.json). SIGTERM or Ctrl-C saves a
checkpoint at the current step and exits 0 (a second one exits at once). Fine-tuning:
--config.init_from=CKPT (configs/finetune.py). Multi-host: run one process per host with
--multihost (and, where jax cannot detect the cluster, the coordinator flags); each host reads
its own share of the data.
"""

import os
import re
import shutil
import sys

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from fec_jax import checkpoint, cli, data, loop, reporting, tasks
from fec_jax.model import model_name

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
cli.define_config_file(
    "config",
    cli.default_config_file(CONFIGS, "demo.py", ("workdir",)),
    "Training config file. Default: the run's own (configs/workdir.py:DIR) where --workdir DIR "
    "holds a config.json, else configs/demo.py.",
    lock_config=True,
)
flags.DEFINE_string(
    "workdir",
    None,
    "The run's directory (required): checkpoints, metrics.jsonl, TensorBoard, plot.",
)
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (one process per host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multihost, optional).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multihost, optional).")
flags.DEFINE_integer("process_id", None, "This process's index (multihost, optional).")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


MULTIHOST_FLAGS = ("coordinator_address", "num_processes", "process_id")


def check_multihost_flags() -> None:
  """The coordinator flags' mistakes, each one line before anything connects: without
  --multihost they would be ignored, and two such processes would be two runs in one workdir."""
  given = [f"--{name}" for name in MULTIHOST_FLAGS if FLAGS[name].present]
  if given and not FLAGS.multihost:
    cli.fail(
        f"{', '.join(given)}: used only with --multihost, to join a multi-process run; add it "
        "(without it each process would be a run of its own, in the same workdir)"
    )
  address = FLAGS.coordinator_address
  port = re.fullmatch(r".+:(\d+)", address or "")
  if address is not None and not (port and 1 <= int(port[1]) <= 65535):
    cli.fail(
        f"--coordinator_address {address!r}: expected HOST:PORT with a port in 1-65535, "
        "e.g. 127.0.0.1:12355"
    )
  n, i = FLAGS.num_processes, FLAGS.process_id
  if n is not None and n < 1:
    cli.fail(f"--num_processes {n} must be >= 1")
  if i is not None and (i < 0 or (n is not None and i >= n)):
    cli.fail(f"--process_id {i} must be in [0, --num_processes{f' {n}' if n else ''})")


def initialize_distributed() -> None:
  """Joins the multi-process job; CPU devices (tests, CPU clusters) talk through gloo."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except ValueError as e:  # e.g. no cluster found and no coordinator given
    cli.fail(
        f"--multihost: {str(e).rstrip('.')}; where jax cannot detect the cluster (TPU pod, "
        "SLURM, ...), give --coordinator_address=HOST:PORT --num_processes=N --process_id=I"
    )


def check_num_processes() -> None:
  """Only process 0 (the coordinator) reads --num_processes: a process given another number
  joins a run of process 0's size all the same. The processes gather what each was given and all
  stop where one differs from the number that joined."""
  given = np.asarray(multihost_utils.process_allgather(np.int32(FLAGS.num_processes or 0)))
  wrong = np.flatnonzero((given != 0) & (given != jax.process_count()))
  if wrong.size:
    cli.fail(
        f"process {wrong[0]} was given --num_processes {given[wrong[0]]}, but "
        f"{reporting.counted(jax.process_count(), 'process')} joined the run: give "
        "every process the same --num_processes"
    )


def main(argv):
  del argv
  cli.check_paths_given([("--workdir", FLAGS.workdir, "the run's directory")])
  if not FLAGS["config"].present:
    check_config_found(FLAGS.workdir)
    note_demo_default(FLAGS.workdir)
  cli.check_data_found(FLAGS.config, FLAGS.workdir, FLAGS["config"].present)
  check_multihost_flags()
  if FLAGS.multihost:
    initialize_distributed()
    check_num_processes()
  new_workdir = not os.path.exists(FLAGS.workdir)
  cli.use_compilation_cache(FLAGS.workdir)
  try:
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except loop.TrainingDiverged as e:
    sys.exit(f"error: {e}")
  except BaseException:  # any failure (cli.run reports a user's mistake as one line)
    if new_workdir:
      remove_cache_only_workdir(FLAGS.workdir)
    raise


def check_config_found(workdir: str) -> None:
  """Without --config, a workdir that holds a run but no config.json (one of an earlier fec-jax)
  is an error: the default, configs/demo.py, is not that run's config. Weights only (a
  convert_torch_weights.py output) are an error whatever the config: it says to use init_from."""
  if not os.path.isdir(workdir) or reporting.has_config(workdir):
    return
  try:
    model, step = checkpoint.load_model(workdir)
  except checkpoint.CheckpointError:  # no checkpoint: a fresh start
    return
  checkpoint.check_is_run(os.path.abspath(workdir), step)
  cli.check_config_found(workdir, "--workdir", model_name(model), False, CONFIGS)


def note_demo_default(workdir: str) -> None:
  """A note on stderr where the config is the default, configs/demo.py, because neither --config
  nor a run to resume gave one: `--workdir=DIR --config.init_from=...` without --config trained
  the digits demo's recipe, or failed on a data override with an error about the demo's data.
  None where a file is in the way of the workdir: the error that it is one comes alone."""
  if cli.not_a_directory(workdir) is None and not reporting.has_config(workdir):
    print(
        f"note: no --config, and --workdir {workdir} holds no run to resume: training "
        "configs/demo.py (the digits demo; to fine-tune, --config=configs/finetune.py)",
        file=sys.stderr,
    )


def remove_cache_only_workdir(workdir: str) -> None:
  """Removes a workdir that this run created and that holds nothing but the compilation cache
  (JAX makes it at the first compile; the library removes one begun while it holds the workdir's
  lock, but several processes compile before: their check that they run the same config) and the
  run's lock file, so that a failed start leaves nothing behind."""
  if os.path.isdir(workdir) and set(os.listdir(workdir)) <= {
      reporting.COMPILATION_CACHE,
      loop.LOCK_FILE,
  }:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  cli.run(
      main,
      errors=(
          ValueError,
          data.DataNotFoundError,
          checkpoint.CheckpointError,
          tasks.MetricsError,
          tasks.TrainLoaderError,
      ),
  )
