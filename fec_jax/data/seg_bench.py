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
import tempfile
import time

import cv2
import numpy as np
from PIL import Image

from fec_jax.data import seg_config, seg_pipeline, seg_sources

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
  make = seg_pipeline._MakeExample(source, cfg, seed=0, train=train)
  count = repeats * len(source)
  start = time.perf_counter()
  for k in range(count):
    make((k % len(source), 0, k))
  return count / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=40)
  parser.add_argument("--dir", default="", help="folder for the generated images (reused)")
  args = parser.parse_args()
  root = args.dir or os.path.join(tempfile.gettempdir(), f"fec_jax_seg_bench_{args.images}")
  if not os.path.isdir(os.path.join(root, "annotations", "training")):
    make_ade20k_like(root, args.images)
  cv2.setNumThreads(1)
  print(f"{args.images} ADE20K-like images in {root}, one core (cv2 with 1 thread):")
  for train in (True, False):
    rate = time_examples(root, train)
    name = "train (ratio resize, crop, flip, photometric, pad)" if train else "test (align resize)"
    print(f"  {name}: {rate:.1f} examples/s")


if __name__ == "__main__":
  main()
