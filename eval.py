r"""Evaluates an FEC checkpoint: top-1, top-5 and loss on the validation split, with the
official evaluation preprocessing (resize to image_size / crop_pct bicubic, center crop,
ImageNet normalization; reference Sec. 8), or the paper's throughput protocol.

  python eval.py --config=configs/fec_small.py --workdir=DIR [--ema] [--step=N]
  python eval.py --config=configs/fec_small.py --checkpoint=CONVERTER_OUTPUT
  python eval.py --config=configs/fec_small.py --checkpoint=DIR --throughput
"""

import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags

import fec_jax
from fec_jax import data, training
from fec_jax import throughput as measure_protocol

config_flags.DEFINE_config_file("config", "configs/demo.py", "Config: data and eval batch.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "A train.py workdir.")
flags.DEFINE_string("checkpoint", None, "A convert_torch_weights.py output (or a workdir).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_bool("ema", False, "Evaluate the EMA weights of a train.py run.")
flags.DEFINE_bool("throughput", False, "Measure inference img/s (batch 256, 20 warm-up "
                  "iterations, mean of 100) instead of accuracy.")
FLAGS = flags.FLAGS

def throughput(model, variables, image_size: int, mesh) -> float:
  """img/s of the jitted forward pass, the paper's batch sharded over the mesh."""
  images = jax.device_put(jnp.zeros((measure_protocol.BATCH, image_size, image_size, 3), jnp.float32),
                          training.batch_sharded(mesh))
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  seconds = measure_protocol.measure(lambda _: forward(variables, images), forward(variables, images))
  return measure_protocol.BATCH / seconds


def main(argv):
  del argv
  config = FLAGS.config
  if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
    raise app.UsageError("give exactly one of --workdir and --checkpoint")
  directory = FLAGS.workdir or FLAGS.checkpoint
  try:
    model, variables = fec_jax.load_pretrained(directory, step=FLAGS.step, ema=FLAGS.ema,
                                               dtype=jnp.dtype(config.model.dtype))
  except fec_jax.checkpoint.CheckpointError as e:
    sys.exit(f"error: {e}")
  mesh = training.create_mesh()
  variables = jax.device_put(variables, training.replicated(mesh))
  size = config.data.image_size
  if FLAGS.throughput:
    print(f"throughput: {throughput(model, variables, size, mesh):.1f} img/s "
          f"({fec_jax.model.variant_name(model.variant)}, {size}x{size}, batch "
          f"{measure_protocol.BATCH}, {jax.device_count()} {jax.devices()[0].platform} device(s))")
    return
  if model.num_classes != config.data.num_classes:
    sys.exit(f"error: the checkpoint has {model.num_classes} classes but "
             f"config.data.num_classes is {config.data.num_classes}")
  try:
    val = data.create_loader(config.data, "val", config.eval_batch_size, config.seed,
                             jax.process_index(), jax.process_count())
  except data.DataNotFoundError as e:
    sys.exit(f"error: {e}")
  eval_step = training.make_eval_step(model, config.data, mesh)
  result = training.evaluate(eval_step, variables["params"], val, mesh)
  logging.info("evaluated %s", directory)
  print(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
        f"({data.num_examples(config.data, 'val')} {config.data.source} val images)")


if __name__ == "__main__":
  app.run(main)
