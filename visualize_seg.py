r"""Draws a segmenter's predictions on the first validation images of a config's data: one row
per image, under its file name, with the image, the ground truth and the prediction (class
colours over the image: mmseg's for ADE20K; --alpha their opacity, 1 for the colours alone), and
a legend of the classes they show (named by config.data.class_names). The picture of the README
and docs/segmentation.md is this command on the demo run. A missing --output folder is made.

With --image, on image files of one's own instead (no annotation, no data folder): a row per
file, under its name (without its folder), with the image and the prediction, the legend naming
the classes predicted. Each file is read as visualize.py reads its images (turned upright by its
EXIF orientation; grayscale, alpha and CMYK as RGB), given to the model with the val split's
test resize (the config's) and its prediction made at the panel's size (--size rows; at most 4
times as wide, with fewer rows, for a very wide image: seg_picture.panel_size).

  python visualize_seg.py --workdir=DIR --output=seg.png [--num=4] [--alpha=0.6]   # its config
  python visualize_seg.py --config=configs/fpn_fec_small_ade20k.py --checkpoint=CONVERTER_OUTPUT \
      --config.data.root=/data/ADEChallengeData2016 --output=ade.png
  python visualize_seg.py --config=configs/fpn_fec_small_ade20k.py --checkpoint=CONVERTER_OUTPUT \
      --image photo.jpg street.png --output=mine.png
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from PIL import Image

import fec_jax
from fec_jax import checkpoint, cli, data, reporting, seg_picture, tasks, training, visualize
from fec_jax.data import classes, seg_sources, seg_transforms, transforms
from fec_jax.model import SEGMENTERS, model_name
from fec_jax.tasks import segmentation

# Without a run's config.json the fallback (demo_seg.py) only lets --config.* overrides parse: a
# checkpoint without one needs --config (cli.check_config_found).
CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
cli.define_config_file(
    "config",
    cli.default_config_file(CONFIGS, "demo_seg.py", ("workdir", "checkpoint")),
    "Segmentation config: data, model dtype. Default: the run's own (configs/workdir.py:DIR) "
    "where --workdir or --checkpoint DIR holds a config.json; a converter output needs one.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "A train.py workdir.")
flags.DEFINE_string("checkpoint", None, "A convert_torch_weights.py output (or a workdir).")
flags.DEFINE_string(
    "output",
    None,
    "The PNG to write (required; a new file: see --overwrite; missing folders are made).",
)
flags.DEFINE_multi_string(
    "image",
    None,
    "Image files to draw the predictions on instead of validation images: --image a.jpg b.png "
    "(or --image repeated); no ground truth is drawn and no data is read.",
)
flags.DEFINE_integer(
    "num", 4, "Validation images drawn (1 to 16), the first ones (not with --image)."
)
flags.DEFINE_integer("size", 192, "Each panel's height in pixels (32 to 1024).")
flags.DEFINE_float(
    "alpha",
    seg_picture.ALPHA,
    "Opacity of the class colours over the image, 0 to 1 (1: the colours alone, as in the "
    "legend).",
)
flags.DEFINE_bool("ema", False, "Use the EMA weights of a train.py run.")
flags.DEFINE_integer("step", None, "The checkpoint step to draw (default: the latest).")
flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")
flags.mark_flag_as_required("output")
FLAGS = flags.FLAGS


def check_arguments(config, images: list[str] | None):
  """Every user mistake is one error line here, before the weights are restored; `images`: the
  --image paths (None without --image)."""
  cli.check_paths_given(
      [
          ("--workdir", FLAGS.workdir, "a train.py workdir"),
          ("--checkpoint", FLAGS.checkpoint, "a convert_torch_weights.py output (or a workdir)"),
          ("--output", FLAGS.output, "the PNG to write"),
      ]
  )
  if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
    cli.fail("give exactly one of --workdir and --checkpoint")
  directory, flag = (
      (FLAGS.workdir, "--workdir") if FLAGS.workdir else (FLAGS.checkpoint, "--checkpoint")
  )
  checkpoint.check_directory(directory, flag)
  if config.task != "segmentation":
    if not FLAGS["config"].present:  # the default: the run's config.json
      cli.fail(
          f"{flag} {directory} holds a {config.task} run; visualize_seg.py draws a segmenter's "
          "predictions (visualize.py: a classifier's clusters)"
      )
    cli.fail(
        f"--config is a {config.task!r} config; expected a segmentation config (e.g. "
        "configs/demo_seg.py)"
    )
  with cli.user_errors(ValueError):
    training.check_compute(config, batch_fields=())
  if images is not None and FLAGS["num"].present:
    cli.fail("--num draws the first validation images; --image draws the images given: give one")
  if not 1 <= FLAGS.num <= 16:
    cli.fail(f"--num {FLAGS.num} must be in [1, 16]")
  if not 32 <= FLAGS.size <= 1024:
    cli.fail(f"--size {FLAGS.size} must be in [32, 1024]")
  if not 0 <= FLAGS.alpha <= 1:
    cli.fail(f"--alpha is an opacity between 0 and 1, got {FLAGS.alpha}")
  output = os.path.abspath(FLAGS.output)
  if not output.lower().endswith(".png"):
    cli.fail(f"--output {FLAGS.output} must end with .png")
  if os.path.isdir(output):
    cli.fail(f"--output {FLAGS.output} is a directory; expected the path of a PNG file")
  folder = os.path.dirname(output)
  problem = cli.not_a_directory(folder)
  if problem is not None:
    cli.fail(f"--output {FLAGS.output}: {problem}; expected a directory for the PNG")
  problem = checkpoint.output_in_a_checkpoint(FLAGS.output, "--output")
  if problem is not None:
    cli.fail(problem)
  if os.path.exists(output) and not FLAGS.overwrite:
    cli.fail(f"--output {FLAGS.output} exists; pass --overwrite to replace it")
  if images is not None:
    visualize.check_images(images)
  data.seg_validate(config.data)
  if images is None:
    cli.check_data_found(config, directory, FLAGS["config"].present)
  # missing data stops here (images of one's own need none)
  num_val = data.seg_num_examples(config.data, "val") if images is None else len(images)
  model, step = checkpoint.load_model(directory, FLAGS.step)
  if FLAGS.ema:
    checkpoint.check_ema(os.path.abspath(directory), step)
  if model_name(model) not in SEGMENTERS:
    cli.fail(
        f"{directory} holds {model_name(model)}, not a segmenter ({', '.join(sorted(SEGMENTERS))})"
    )
  cli.check_config_found(directory, flag, model_name(model), FLAGS["config"].present, CONFIGS)
  try:
    tasks.get(config).check_num_classes(model)
  except ValueError as e:
    cli.fail(str(e))
  return output, min(FLAGS.num, num_val)


def read_examples(d, num: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
  """The first `num` readable validation examples of data config `d`: (uint8 [h, w, 3] image at
  the test size, uint8 [H0, W0] label at the original size, the image's file name:
  ADE_val_00000001.jpg, shapes-val-0 in the demo); fails if none is readable."""
  examples, tried = [], 0
  records = seg_sources.make_seg_source(d, "val")  # the loader's, in its order (one host's: all)
  loader = data.create_seg_loader(d, "val", 1, seed)
  try:
    for example in loader:
      if len(examples) == num:
        break
      tried += 1
      if example["mask"]:  # False for a bad file (the loader logs which and why)
        name = os.path.basename(records.key(tried - 1))
        examples.append((example["image"], example["label"], name))
  finally:
    loader.close()
  if not examples:
    where = (
        f"{os.path.join(d.root, 'images', d.val_split)} (annotations in "
        f"{os.path.join(d.root, 'annotations', d.val_split)})"
        if d.source == "ade20k"
        else f"the {d.source} val split"
    )
    cli.fail(
        f"no readable validation image in {where}: all {tried} failed to load (unreadable or "
        "corrupt files, or annotations that are not single-channel PNGs of class ids or not the "
        "image's size; the warnings above name them)"
    )
  return examples


def read_images(paths: list[str], d, height: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
  """Image files as the model and the picture take them: (uint8 [h, w, 3] the model input, the
  val split's test resize of data config `d`; uint8 [rows, columns, 3] the image at its panel's
  size, seg_picture.panel_size(h, w, height), keeping its ratio; the file's name, without its
  folder). Read as visualize.py reads its images (visualize.read_image: upright by EXIF,
  grayscale, alpha, CMYK as RGB); a file that does not decode is one error line."""
  read = []
  for path in paths:
    try:
      original = visualize.read_image(path)
    except (OSError, transforms.BadImageError) as e:
      cli.fail(f"--image {path} is not a readable image ({e})")
    try:
      resized = seg_transforms.eval_transform(original, d)
    except transforms.BadImageError as e:  # an image too thin for the test resize
      cli.fail(f"--image {path}: {e}")
    rows, columns = seg_picture.panel_size(*original.shape[:2], height)
    shown = Image.fromarray(original).resize((columns, rows), Image.BILINEAR)
    read.append((resized, np.asarray(shown), os.path.basename(path)))
  return read


def main(argv):
  if not FLAGS["verbosity"].present:  # as eval.py: warnings (a bad file named), no info lines
    logging.set_verbosity(logging.WARNING)
  images = None
  if FLAGS.image is not None:  # --image a.jpg b.jpg: absl leaves b.jpg in argv
    if len(FLAGS.image) > 1 and argv[1:]:  # their order on the command line is lost
      cli.fail(
          "give the image files after one --image (--image a.jpg b.jpg), or each after its own "
          "--image"
      )
    images = [*FLAGS.image, *argv[1:]]
  elif argv[1:]:
    cli.fail(f"unexpected argument {argv[1]}: image files follow --image (see --help)")
  config = FLAGS.config
  output, num = check_arguments(config, images)
  d = config.data
  if images is not None:  # before the restore: a bad file fails fast
    examples = read_images(images, d, FLAGS.size)
  else:
    examples = read_examples(d, num, config.seed)  # before the restore: a bad split fails fast
  if images is None and len(examples) < FLAGS.num:
    print(
        f"note: --num {FLAGS.num}: the {data.split_name(d, 'val')} split of "
        f"{data.data_location(d)} holds only {reporting.counted(len(examples), 'readable image')}",
        file=sys.stderr,
    )
  cli.note_config_differences(
      config, FLAGS.workdir or FLAGS.checkpoint, given=FLAGS["config"].present
  )
  model, variables = fec_jax.load_pretrained(
      FLAGS.workdir or FLAGS.checkpoint,
      FLAGS.step,
      ema=FLAGS.ema,
      dtype=jnp.dtype(config.model.dtype),
  )

  predict = jax.jit(  # compiled once per image size and size predicted
      lambda v, image, out_hw: segmentation.predict_labels(model, v, image, out_hw, d),
      static_argnums=2,
  )

  # A line every 30 s: each new image size compiles (tens of seconds at ADE20K's sizes on a CPU).
  progress = tasks.Progress(
      len(examples),
      "image",
      None,
      lambda line: print(line, file=sys.stderr, flush=True),
      verb="predicted",
      split="val " if images is None else "",
  )
  rows = []
  for done, (image, target, _) in enumerate(examples, 1):
    if images is None:  # target: the annotation
      pred = predict(variables, image[None], target.shape)[0]
      # The image at the annotation's size, for the overlay (the model saw the test resize).
      image = np.asarray(Image.fromarray(image).resize(target.shape[::-1], Image.BILINEAR))
      rows.append((image, target, np.asarray(pred)))
    else:  # target: the image at the panel's size, where the prediction is made
      rows.append((target, np.asarray(predict(variables, image[None], target.shape[:2])[0])))
    progress.update(done)
  picture = seg_picture.draw(
      rows,
      seg_picture.palette(d),
      classes.segmentation_names(d),
      FLAGS.size,
      FLAGS.alpha,
      seg_picture.TITLES if images is None else seg_picture.IMAGE_TITLES,
      tuple(name for *_, name in examples),
  )
  os.makedirs(os.path.dirname(output), exist_ok=True)  # as visualize.py its --out
  picture.save(output)
  what = "val image" if images is None else "image"
  print(f"wrote {output} ({reporting.counted(len(rows), what)})")


if __name__ == "__main__":
  cli.run(main, errors=(ValueError, data.DataNotFoundError, checkpoint.CheckpointError))
