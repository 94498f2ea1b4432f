r"""Evaluates an FEC checkpoint with the evaluator of the config's task (classification:
top-1, top-5 where there are more than 5 classes, and loss on the validation split, with the
official evaluation preprocessing),
or measures inference throughput with the paper's protocol.

  python eval.py --workdir=DIR [--ema] [--step=N] [--per_class]   # the run's own config
  python eval.py --config=configs/fec_small.py --checkpoint=CONVERTER_OUTPUT
  python eval.py --config=configs/fec_small.py --checkpoint=DIR --throughput [--batch=256]
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags, logging

import fec_jax
from fec_jax import checkpoint, cli, data, reporting, tasks, throughput, training
from fec_jax.model import SEGMENTERS, model_name

# Without a run's config.json the fallback (demo.py) only lets --config.* overrides parse: a
# checkpoint without one needs --config (cli.check_config_found).
CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
cli.define_config_file(
    "config",
    cli.default_config_file(CONFIGS, "demo.py", ("workdir", "checkpoint")),
    "Config: task, data, eval batch. Default: the run's own (configs/workdir.py:DIR) where "
    "--workdir or --checkpoint DIR holds a config.json; a converter output needs one.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "A train.py workdir.")
flags.DEFINE_string("checkpoint", None, "A convert_torch_weights.py output (or a workdir).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_bool("ema", False, "Evaluate the EMA weights of a train.py run.")
flags.DEFINE_bool(
    "per_class",
    False,
    "Also print a table of each class's metrics (classification: images, top-1, top-5 with "
    "more than 5 classes; segmentation: IoU, Acc, as mmseg's).",
)
flags.DEFINE_bool(
    "throughput",
    False,
    "Measure inference img/s instead of accuracy (the "
    "paper's protocol: --batch 256, --warmup 20, --iters 100).",
)
flags.DEFINE_integer(
    "batch", throughput.BATCH, "Throughput: images per forward pass.", lower_bound=1
)
flags.DEFINE_integer("warmup", throughput.WARMUP, "Throughput: warm-up iterations.", lower_bound=0)
flags.DEFINE_integer("iters", throughput.ITERS, "Throughput: timed iterations.", lower_bound=1)
FLAGS = flags.FLAGS


def measure_throughput(model, variables, image_shape: tuple[int, ...], mesh) -> float:
  """img/s of the jitted forward pass, --batch images of `image_shape` ([H, W, 3]) sharded over
  the mesh."""
  images = jax.device_put(
      jnp.zeros((FLAGS.batch, *image_shape), jnp.float32), training.batch_sharded(mesh)
  )  # [batch, H, W, 3]
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  print(f"compiling the forward pass for batch {FLAGS.batch} ...", file=sys.stderr, flush=True)
  start = time.perf_counter()
  forward.lower(variables, images).compile()
  print(
      f"compiled in {time.perf_counter() - start:.1f} s; {FLAGS.warmup} warm-up and "
      f"{FLAGS.iters} timed iterations ...",
      file=sys.stderr,
      flush=True,
  )
  seconds = throughput.measure(
      lambda _: forward(variables, images), None, FLAGS.warmup, FLAGS.iters
  )
  return FLAGS.batch / seconds


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # a progress line, then the result (--verbosity=0: the logs)
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  cli.check_paths_given(
      [
          ("--workdir", FLAGS.workdir, "a train.py workdir"),
          ("--checkpoint", FLAGS.checkpoint, "a convert_torch_weights.py output (or a workdir)"),
      ]
  )
  if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
    cli.fail("give exactly one of --workdir and --checkpoint")
  directory = FLAGS.workdir or FLAGS.checkpoint
  flag = "--workdir" if FLAGS.workdir else "--checkpoint"
  checkpoint.check_directory(directory, flag)
  found, step = checkpoint.load_model(directory, FLAGS.step)  # the model only: fast
  held = model_name(found)
  cli.check_config_found(directory, flag, held, FLAGS["config"].present, CONFIGS)
  if not FLAGS.throughput:  # which times the model on zeros: no data is read
    cli.check_data_found(config, directory, FLAGS["config"].present)
  cli.use_compilation_cache(directory, create=False)  # a run's holds its compiled eval steps
  task = tasks.get(config)
  timing = [f"--{name}" for name in ("batch", "warmup", "iters") if FLAGS[name].present]
  if timing and not FLAGS.throughput:
    batch = (
        "--config.eval_batch_size"
        if task.BATCHED_EVALUATION
        else "one image (this task's evaluator takes one at a time)"
    )
    cli.fail(f"{', '.join(timing)}: used only with --throughput; the evaluation's batch is {batch}")
  if FLAGS.per_class and FLAGS.throughput:
    cli.fail("--per_class tables an evaluation's metrics; --throughput measures speed: give one")
  mesh = training.create_mesh()
  if FLAGS.throughput and FLAGS.batch % jax.device_count():
    cli.fail(f"--batch {FLAGS.batch} is not divisible by the {jax.device_count()} devices")
  batched = task.BATCHED_EVALUATION and not FLAGS.throughput  # --throughput has --batch
  training.check_compute(config, batch_fields=("eval_batch_size",) if batched else ())
  try:
    task.check_config()
  except data.DataNotFoundError:  # e.g. a segmenter's val split, which only an evaluation reads
    if not FLAGS.throughput:
      raise
  if held != config.model.name:
    if (held in SEGMENTERS) == (config.model.name in SEGMENTERS):
      fix = f"give that model's config (--config.model.name={held})"
    elif held in SEGMENTERS:  # a checkpoint of the other task
      fix = f"give a segmentation config (configs/{cli.config_name(held)}, configs/demo_seg.py)"
    else:
      fix = f"give a classification config (configs/{cli.config_name(held)}, configs/demo.py)"
    cli.fail(f"{flag} {directory} holds {held}; the config's model is {config.model.name}: {fix}")
  if not FLAGS.throughput:  # before the weights load: an evaluation under other names is no use
    task.check_num_classes(found)  # the evaluator's check, from the model item, not the arrays
    change = tasks.label_names_change(task.data_label_names(), directory)
    if change is not None:
      cli.fail(
          f"{flag} {directory} holds a run whose labels index other classes than config.data's: "
          f"{change}. Its predictions would be scored against other classes: give the classes "
          "the names they had when the run started, or evaluate it on data with its classes"
      )
  model, variables = fec_jax.load_pretrained(
      directory, step=step, ema=FLAGS.ema, dtype=jnp.dtype(config.model.dtype)
  )
  variables = jax.device_put(variables, training.replicated(mesh))
  if FLAGS.throughput:
    image_shape = task.input_shape()[1:]  # a classifier's image_size, a segmenter's crop_size
    img_per_s = measure_throughput(model, variables, image_shape, mesh)
    print(
        f"throughput: {img_per_s:.1f} img/s ({model_name(model)}, {config.model.dtype}, "
        f"{image_shape[0]}x{image_shape[1]}, batch {FLAGS.batch}, "
        f"{reporting.counted(jax.device_count(), jax.devices()[0].platform + ' device')})"
    )
    return
  weights = checkpoint.weights_name(directory, step, FLAGS.ema)
  evaluator = task.evaluator(model, mesh)
  cli.note_config_differences(config, directory, given=FLAGS["config"].present)
  where = data.data_location(config.data)
  print(  # the compute dtype too: bfloat16 in most configs, float32 where one asks for it
      f"evaluating {directory} ({weights}, {config.model.dtype}) on the "
      f"{data.split_name(config.data, 'val')} split of {where} ...",
      file=sys.stderr,
      flush=True,
  )
  metrics = evaluator(variables, FLAGS.per_class, log=lambda line: print(line, file=sys.stderr))
  if FLAGS.per_class:
    print(task.per_class_table(metrics["per_class"]))
  print(f"{task.describe(metrics)}  [{weights}]")


if __name__ == "__main__":
  cli.run(
      main,
      errors=(ValueError, data.DataNotFoundError, checkpoint.CheckpointError, tasks.MetricsError),
  )
