"""Loader benchmark: decoded + augmented images per second per CPU core.

    python -m fec_jax.data.bench [--images 200] [--dir DIR] [--loader-workers 0] [--batch-size 32]

Writes (or reuses) a generated JPEG folder with ImageNet-like sizes (mostly 500x375 /
375x500 / 500x333 / 500x500, some larger; textured content, quality 90, about 110 KB on
average like ImageNet's train JPEGs), then times, in this single process (one core), file
read + decode + the host part of the official train transform (uint8 out; normalization and
the erasing fill run on device) and file read + decode + the eval transform. With
--loader-workers N it also times the full grain loader with N worker processes (images/s for
the whole host).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from fec_jax import cli, reporting
from fec_jax.data import config as config_lib
from fec_jax.data import pipeline, sources, transforms

_SIZES = ((500, 375), (375, 500), (500, 333), (500, 500), (640, 480), (800, 600), (1024, 768))
_SIZE_WEIGHTS = (0.35, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05)
SPLITS = ("train", "val")  # the folders of a class-folder dataset that the benchmark times


def make_jpeg_folder(root: str, num_images: int, num_classes: int = 4, seed: int = 0) -> str:
  """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG with ImageNet-like sizes."""
  rng = np.random.default_rng(seed)
  for split in SPLITS:
    for i in range(num_images):
      w, h = _SIZES[rng.choice(len(_SIZES), p=_SIZE_WEIGHTS)]
      d = os.path.join(root, split, f"n{i % num_classes:08d}")
      os.makedirs(d, exist_ok=True)
      low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
      img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
      noise = rng.normal(0, 12, (h, w, 3))
      img = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
      Image.fromarray(img).save(os.path.join(d, f"img_{i}.JPEG"), quality=90)
  return root


def _files(split_dir: str) -> list:
  """The paths of a split's images as the loader lists them (sources.scan_folder: image files in
  class folders), not the other files a folder may hold (notes, annotations)."""
  return [os.path.join(split_dir, os.fsdecode(p)) for p in sources.scan_folder(split_dir).paths]


def time_transform(files: list, cfg, train: bool, repeats: int = 2) -> tuple[float, float]:
  """(images per second on this core for read + decode + the train or eval transform,
  the share of that time spent decoding)."""
  ra = transforms.randaugment_setup(cfg)
  rng = np.random.default_rng(0)
  decoding, bad = 0.0, set()
  start = time.perf_counter()
  for _ in range(repeats):
    for path in files:
      with open(path, "rb") as f:
        encoded = f.read()
      t = time.perf_counter()
      try:
        image, _ = transforms.decode(encoded)
      except transforms.BadImageError:  # left out of the timing
        bad.add(path)
        continue
      finally:
        decoding += time.perf_counter() - t
      if train:
        transforms.train_transform(rng, image, cfg, *ra)
      else:
        transforms.eval_transform(image, cfg)
  seconds = time.perf_counter() - start
  if bad:
    print(
        f"note: {reporting.counted(len(bad), 'unreadable image')} skipped, e.g. "
        f"{sources.one_line(min(bad))}",
        file=sys.stderr,
    )
  return repeats * (len(files) - len(bad)) / seconds, decoding / seconds


def time_loader(cfg, split: str, batch: int, num_batches: int) -> float:
  """Images per second of the full grain loader (whole host, after warm-up)."""
  it = pipeline.create_loader(cfg, split, batch, seed=0)
  next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  rate = num_batches * batch / (time.perf_counter() - start)
  it.close()
  return rate


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
      prog="python -m fec_jax.data.bench",
      description=__doc__,
      formatter_class=cli.HelpFormatter,
  )
  p.add_argument("--images", type=int, default=200, help="images per split of a new folder")
  p.add_argument(
      "--dir",
      help="JPEG folder to create, or to reuse as it is (default: a temporary folder, removed "
      "at the end)",
  )
  p.add_argument(
      "--loader-workers",
      type=int,
      default=0,
      help="also time the grain loader with this many worker processes (0: none)",
  )
  p.add_argument(
      "--batch-size", type=int, default=32, help="the grain loader's batch (with --loader-workers)"
  )
  return p


def _check_args(args) -> None:
  """fail() for a bad value, before any file is written or timed."""
  cli.check_paths_given([("--dir", args.dir, "a folder to create or reuse")])
  if args.images < 1:
    cli.fail(f"--images must be at least 1, got {args.images}")
  if args.batch_size < 1:
    cli.fail(f"--batch-size must be at least 1, got {args.batch_size}")
  if args.loader_workers < 0:
    cli.fail(f"--loader-workers must be 0 (no loader timing) or more, got {args.loader_workers}")
  if args.dir is not None:
    blocker = cli.not_a_directory(args.dir)
    if blocker:
      cli.fail(f"--dir {args.dir}: {blocker}; expected a folder to create or reuse")


def _reused_folder(root: str) -> tuple[int, int]:
  """(train, val images) of a class folder given as --dir, after checking its layout."""
  counts = []
  for split in SPLITS:
    try:
      sources.scan_folder(os.path.join(root, split))
    except sources.DataNotFoundError as e:
      cli.fail(
          f"--dir {root}: {str(e).split(';')[0]}; expected a class folder "
          "(train/<class>/*, val/<class>/*), or give a new or empty --dir"
      )
    counts.append(len(_files(os.path.join(root, split))))
  return counts[0], counts[1]


def _inside_a_dataset(root: str) -> tuple[str, str] | None:
  """(what `root` is, the dataset's folder) where `root` is a split (train/, val/) of a
  class-folder dataset or a class folder of one (the folder above holds both splits); else
  None."""
  path = os.path.abspath(root)
  parent = os.path.dirname(path)
  grandparent = os.path.dirname(parent)

  def a_dataset(folder: str) -> bool:
    return all(os.path.isdir(os.path.join(folder, split)) for split in SPLITS)

  if os.path.basename(path) in SPLITS and a_dataset(parent):
    return f"the {os.path.basename(path)} split", parent
  if os.path.basename(parent) in SPLITS and a_dataset(grandparent):
    return f"a class folder of the {os.path.basename(parent)} split", grandparent
  return None


def _check_new_dir(root: str) -> None:
  """fail() where a --dir without train/, which the benchmark would write its JPEGs to, is part
  of a class-folder dataset (even empty or new: the JPEGs would join the dataset) or holds
  anything."""
  inside = _inside_a_dataset(root)
  if inside is not None:
    cli.fail(
        f"--dir {root} is {inside[0]} of the class-folder dataset {inside[1]}; give --dir "
        f"{inside[1]}, the folder that holds train/ and val/"
    )
  held = sorted(os.listdir(root)) if os.path.isdir(root) else []
  if held:
    cli.fail(  # held may be class folders: --dir is then a split, not the dataset's root
        f"--dir {root} holds {reporting.listed([repr(name) for name in held], 3)} but no train/ "
        "folder; expected a class folder (train/<class>/*, val/<class>/*) to time, or a new or "
        "empty folder to write JPEGs to"
    )


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  _check_args(args)
  root = args.dir
  reused = root is not None and os.path.isdir(os.path.join(root, "train"))
  if root is not None and not reused:
    _check_new_dir(root)
  num_train, num_val = _reused_folder(root) if reused else (args.images, args.images)
  if args.loader_workers and num_train < args.batch_size:
    held = (
        f"--dir {root} holds {reporting.counted(num_train, 'train image')}"
        if reused
        else f"--images {num_train}"
    )
    cli.fail(
        f"{held}: the grain loader needs at least one batch of them (--batch-size "
        f"{args.batch_size}); give more images or a smaller --batch-size"
    )
  if (num_train, num_val) != (args.images, args.images):  # a folder given: timed as it is
    asked = args.images != parser.get_default("images")  # --images given, for this folder
    print(
        f"note: --dir {root} holds {num_train} train and "
        f"{reporting.counted(num_val, 'val image')}: timing those"
        + (f" (--images {args.images} is for a new folder)" if asked else ""),
        file=sys.stderr,
        flush=True,
    )
  if root is not None:
    _time(args, root, reused, num_train, num_val)
    return
  with tempfile.TemporaryDirectory(prefix="fec_bench_") as root:
    _time(args, root, reused, num_train, num_val)


def _time(args, root: str, reused: bool, num_train: int, num_val: int) -> None:
  """Writes the JPEG folder unless `reused`, then times the transforms (and the loader)."""
  if not reused:
    print(f"writing {args.images} JPEGs per split to {root} ...", file=sys.stderr, flush=True)
    make_jpeg_folder(root, args.images)
  train_files = _files(os.path.join(root, "train"))
  held = f"{reporting.counted(num_train, 'image')} per split"
  if num_val != num_train:
    held = f"{num_train} train and {reporting.counted(num_val, 'val image')}"
  mean_kb = np.mean([os.path.getsize(f) for f in train_files]) / 1024
  cfg = config_lib.default_config()
  print(
      f"{held} in {root}, mean {mean_kb:.0f} KB; "
      f"recipe: {cfg.rand_augment}, reprob {cfg.reprob} {cfg.remode}, {cfg.image_size}px"
  )
  for name, split, train in (("train", "train", True), ("eval", "val", False)):
    files = _files(os.path.join(root, split))
    rate, decode_share = time_transform(files, cfg, train)
    if not rate:  # every image was skipped (the note above names one)
      cli.fail(
          f"--dir {root}: none of the {len(files)} {split} images decodes; expected image files "
          "that decode"
      )
    print(
        f"{name} transform: {rate:7.1f} images/s/core ({1e3 / rate:.2f} ms/image, "
        f"{100 * decode_share:.0f}% of it decoding)"
    )
  if args.loader_workers > 0:
    classes = sources.scan_folder(os.path.join(root, "train")).classes
    cfg.root, cfg.num_classes, cfg.num_workers = root, len(classes), args.loader_workers
    rate = time_loader(cfg, "train", args.batch_size, max(1, len(train_files) // args.batch_size))
    print(
        f"grain loader, {reporting.counted(args.loader_workers, 'worker')}: "
        f"{rate:7.1f} train images/s "
        f"({rate / args.loader_workers:.1f} per worker)"
    )


if __name__ == "__main__":
  main()
