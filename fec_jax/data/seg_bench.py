"""Segmentation loader benchmark: ADE20K-like examples per second on one CPU core.

    python -m fec_jax.data.seg_bench [--images 40] [--dir DIR]

Writes (or reuses) a generated ADEChallengeData2016-layout folder (images/training/*.jpg,
annotations/training/*.png) with ADE20K-like sizes (mostly 683x512 / 512x683, some
smaller and larger; textured content, JPEG quality 90; annotations of blocky regions of
the 151 raw labels), then times, in this process with cv2 held to one thread, what a
loader worker does per example: file reads, decoding, and the host part of the train
pipeline (ratio resize, cat_max_ratio crop, flip, photometric distortion, pad) or of the
test pipeline (keep-ratio resize and AlignResize; the label kept at full size).
"""

import argparse
import os
import sys
import tempfile
import time

import cv2
import numpy as np
from PIL import Image

from fec_jax import cli
from fec_jax.data import seg_config, seg_pipeline, seg_sources
from fec_jax.data.sources import DataNotFoundError

_SIZES = ((683, 512), (512, 683), (512, 384), (640, 480), (512, 512), (1024, 768))  # (w, h)
_SIZE_WEIGHTS = (0.45, 0.2, 0.1, 0.1, 0.1, 0.05)


def make_ade20k_like(root: str, num_images: int, seed: int = 0) -> str:
  """root/images/training/*.jpg and root/annotations/training/*.png, ADE20K-like sizes."""
  rng = np.random.default_rng(seed)
  for sub in ("images", "annotations"):
    os.makedirs(os.path.join(root, sub, "training"), exist_ok=True)
  for i in range(num_images):
    w, h = _SIZES[rng.choice(len(_SIZES), p=_SIZE_WEIGHTS)]
    low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, (h, w, 3))
    blocks = rng.integers(0, 151, (h // 64 + 1, w // 64 + 1), dtype=np.uint8)
    label = cv2.resize(blocks, (w, h), interpolation=cv2.INTER_NEAREST)
    name = f"ADE_train_{i + 1:08d}"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        os.path.join(root, "images", "training", name + ".jpg"), quality=90
    )
    Image.fromarray(label).save(os.path.join(root, "annotations", "training", name + ".png"))
  return root


def time_examples(root: str, train: bool, repeats: int = 2) -> float:
  """Examples per second for read + decode + the train or test host pipeline."""
  cfg = seg_config.ade20k_config()
  source = seg_sources.ADE20KSource(root, "training")
  make = seg_pipeline.MakeExample(source, cfg, seed=0, train=train)
  count = repeats * len(source)
  start = time.perf_counter()
  for k in range(count):
    make((k % len(source), 0, k))
  return count / (time.perf_counter() - start)


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
      prog="python -m fec_jax.data.seg_bench",
      description=__doc__,
      formatter_class=cli.HelpFormatter,
  )
  p.add_argument("--images", type=int, default=40, help="images of a new folder")
  p.add_argument(
      "--dir",
      help=(
          "folder to create, or to reuse as it is (default: fec_jax_seg_bench_<images> in the "
          "temporary directory, reused)"
      ),
  )
  return p


def _reused_folder(args, root: str) -> int:
  """The examples of a folder made earlier, after checking its layout; a note on stderr where it
  holds another number than --images (it is timed as it is)."""
  try:
    held = len(seg_sources.scan_ade20k(root, "training")[0])
  except DataNotFoundError as e:
    cli.fail(
        f"--dir {root}: {str(e).split(';')[0]}; expected a folder this command wrote "
        "(images/training/*.jpg and annotations/training/*.png), or give a new or empty --dir"
    )
  if held != args.images:
    print(
        f"note: --dir {root} was written earlier and holds {held} images: timing those "
        f"(--images {args.images} is for a new folder)",
        file=sys.stderr,
        flush=True,
    )
  return held


def _complete(root: str, num_images: int) -> bool:
  """Whether the default folder holds all it should (not an interrupted run's part of it)."""
  try:
    return len(seg_sources.scan_ade20k(root, "training")[0]) == num_images
  except DataNotFoundError:
    return False


def main(argv=None):
  args = _parser().parse_args(argv)
  cli.check_paths_given([("--dir", args.dir, "a folder to create or reuse")])
  if args.images < 1:
    cli.fail(f"--images must be at least 1, got {args.images}")
  root = args.dir or os.path.join(tempfile.gettempdir(), f"fec_jax_seg_bench_{args.images}")
  blocker = cli.not_a_directory(root)
  if blocker:
    where = f"--dir {root}" if args.dir else f"the default folder {root} (give --dir)"
    cli.fail(f"{where}: {blocker}; expected a folder to create or reuse")
  if args.dir is not None:
    reused = any(os.path.isdir(os.path.join(root, sub)) for sub in ("images", "annotations"))
    if not reused and os.path.isdir(root) and os.listdir(root):  # as fec_jax.data.bench
      cli.fail(
          f"--dir {root} holds files but no images/ or annotations/ folder; expected an "
          "ADE20K-like folder (images/training/*.jpg, annotations/training/*.png) to time, or a "
          "new or empty folder to write one to"
      )
  else:  # ours, named by --images: reused when complete, else (re)written
    reused = _complete(root, args.images)
  num_images = _reused_folder(args, root) if reused else args.images
  if not reused:
    print(f"writing {args.images} ADE20K-like images to {root} ...", file=sys.stderr, flush=True)
    make_ade20k_like(root, args.images)
    seg_sources.scan_ade20k.cache_clear()  # it may have listed an incomplete folder above
  cv2.setNumThreads(1)
  print(f"{num_images} ADE20K-like images in {root}, one core (cv2 with 1 thread):")
  for train in (True, False):
    rate = time_examples(root, train)
    name = "train (ratio resize, crop, flip, photometric, pad)" if train else "test (align resize)"
    print(f"  {name}: {rate:.1f} examples/s")


if __name__ == "__main__":
  main()
