"""Random-access segmentation sources (grain's RandomAccessDataSource protocol).

Every source yields records {'image': bytes (an encoded image file) or uint8 [H, W, 3],
'label': bytes (an encoded PNG annotation) or uint8 [H, W], 'key', 'label_key': str (the
image's and the annotation's file names, for error reports)}; `key(index)` is a record's 'key'
without reading it. Decoding happens later in the pipeline's workers, so that a bad file is
counted and replaced (train) or masked out (val) there.
"""

import functools
import logging
import os
import re

import numpy as np

from fec_jax.data.seg_config import DEMO_NUM_CLASSES
from fec_jax.data.sources import DataNotFoundError, IMG_EXTENSIONS, check_split, one_line
from fec_jax.reporting import counted

log = logging.getLogger(__name__)

IMG_SUFFIX, SEG_MAP_SUFFIX = ".jpg", ".png"  # mmseg's ADE20KDataset suffixes (case-sensitive)

ADE20K_LAYOUT_HELP = (
    "expected the ADE20K layout of mmsegmentation: <root>/images/{training,validation}/*.jpg "
    "and <root>/annotations/{training,validation}/*.png, one annotation with the same file stem "
    "per image (unzip ADEChallengeData2016.zip of the MIT Scene Parsing benchmark and point "
    "config.data.root at its ADEChallengeData2016 folder)"
)


def _scan(directory: str, suffix: str) -> list[str]:
  """Paths relative to `directory` of the files ending with `suffix`, sorted (as mmseg)."""
  found = []
  for dirpath, _, files in os.walk(directory, followlinks=True):
    rel = os.path.relpath(dirpath, directory)
    found += [os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(suffix)]
  return sorted(found)


def _unused_message(img_dir: str, ann_dir: str, unused: list[str]) -> str:
  """The warning for annotations (paths relative to ann_dir) without a .jpg image: images are
  read as .jpg only, so it names the image found with another suffix (w.png, w.JPG) where one
  is there."""
  others = {}  # file stem -> an image with another suffix (relative to img_dir)
  for path in _scan(img_dir, ""):
    if path.lower().endswith(IMG_EXTENSIONS) and not path.endswith(IMG_SUFFIX):
      others.setdefault(os.path.splitext(path)[0], path)
  stems = [a[: -len(SEG_MAP_SUFFIX)] for a in unused]
  found = [others[stem] for stem in stems if stem in others]
  message = (
      f"{counted(len(unused), 'annotation')} under {ann_dir} without a {IMG_SUFFIX} image, not "
      f"used (images are read as {IMG_SUFFIX}, as ADE20K's), first: {one_line(unused[0])}"
  )
  if found:
    message += (
        f"; with an image of another suffix, which is not read: {len(found)} of them, e.g. "
        f"{one_line(os.path.join(img_dir, found[0]))}"
    )
  return message


@functools.lru_cache(maxsize=8)
def scan_ade20k(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(image paths, annotation paths) relative to root, bytes [N] each (os.fsencode: any file
  name, non-ASCII included), sorted by image path.

  Raises DataNotFoundError (before any image is read) for a missing folder, a split without
  images, or an image without its annotation (naming the first such image); warns of annotations
  without an image (not used)."""
  img_dir = os.path.join(root, "images", split)
  ann_dir = os.path.join(root, "annotations", split)
  inner = os.path.join(root, "ADEChallengeData2016")
  for d in (img_dir, ann_dir):
    if not os.path.isdir(d):
      parent = os.path.dirname(d)
      # root given as <root>/images or <root>/images/training: the dataset folder above it
      above = os.path.dirname(os.path.abspath(root))  # abspath: a relative `images` has one too
      outer = next(
          (
              p
              for p in (above, os.path.dirname(above))
              if all(os.path.isdir(os.path.join(p, k)) for k in ("images", "annotations"))
          ),
          None,
      )
      hint = ""
      if os.path.isdir(inner):
        hint = f" (did you mean {inner}?)"
      elif outer is not None:
        hint = (
            f" (did you mean {outer}? config.data.root is the folder that holds images/ "
            "and annotations/)"
        )
      elif os.path.isdir(parent):  # other split names, e.g. train/val
        folders = sorted(e.name for e in os.scandir(parent) if e.is_dir())
        hint = (
            f" ({parent} holds {', '.join(folders) if folders else 'no folder'}; "
            "config.data.train_split and config.data.val_split name the split folders)"
        )
      raise DataNotFoundError(f"{d} is not a directory{hint}; {ADE20K_LAYOUT_HELP}")
  images = _scan(img_dir, IMG_SUFFIX)
  if not images:
    found = [p for p in _scan(img_dir, "") if p.lower().endswith(IMG_EXTENSIONS)]
    other_case = [p for p in found if p.lower().endswith(IMG_SUFFIX)]
    hint = ""
    if other_case:
      hint = f" ({counted(len(other_case), 'file')} in another case, e.g. {other_case[0]})"
    elif found:
      hint = (
          f" ({counted(len(found), 'file')} with another suffix, e.g. {found[0]}: images are "
          f"read as {IMG_SUFFIX}, as ADE20K's)"
      )
    raise DataNotFoundError(
        f"no {IMG_SUFFIX} images found under {img_dir}{hint}; {ADE20K_LAYOUT_HELP}"
    )
  annotations = set(_scan(ann_dir, SEG_MAP_SUFFIX))
  wanted = [p[: -len(IMG_SUFFIX)] + SEG_MAP_SUFFIX for p in images]
  missing = [(i, a) for i, a in zip(images, wanted) if a not in annotations]
  if missing:
    image, annotation = missing[0]
    stem = annotation[: -len(SEG_MAP_SUFFIX)]
    found = _scan(ann_dir, "")
    other = next((p for p in found if os.path.splitext(p)[0] == stem), None)
    # e.g. <stem>_mask.png, mmseg's seg_map_suffix '_mask.png' (not another image's annotation)
    longer, used = re.compile(re.escape(stem) + r"[-_.]"), set(wanted)
    named = next((p for p in found if longer.match(p) and p not in used), None)
    hint = ""
    if other is not None:  # e.g. masks saved as JPEGs, whose lossy pixels are no class ids
      hint = (
          f" (found {one_line(os.path.join(ann_dir, other))}: annotations are read as "
          f"{SEG_MAP_SUFFIX}, PNGs of class ids, as ADE20K's)"
      )
    elif named is not None:
      hint = (
          f" (found {one_line(os.path.join(ann_dir, named))}: an annotation is named as its "
          f"image, with {SEG_MAP_SUFFIX} for {IMG_SUFFIX}, as ADE20K's; rename the annotations)"
      )
    raise DataNotFoundError(
        f"{counted(len(missing), 'image')} without annotation, first: "
        f"{os.path.join(img_dir, image)} has no {os.path.join(ann_dir, annotation)}{hint}; "
        f"{ADE20K_LAYOUT_HELP}"
    )
  unused = sorted(annotations.difference(wanted))
  if unused:  # not an error (mmseg lists the images), but a folder the user may not expect
    log.warning("%s", _unused_message(img_dir, ann_dir, unused))
  to_root = lambda d, paths: np.array(
      [os.fsencode(os.path.join(d, p)) for p in paths], dtype=np.bytes_
  )
  return (
      to_root(os.path.join("images", split), images),
      to_root(os.path.join("annotations", split), wanted),
  )


class ADE20KSource:
  """<root>/images/<split>/**/*.jpg with <root>/annotations/<split>/**/*.png (same stem), in
  mmseg's order (sorted by image path); annotations without an image are not used."""

  def __init__(self, root: str, split: str):
    self._root = root
    self._images, self._annotations = scan_ade20k(root, split)

  def __len__(self) -> int:
    return len(self._images)

  def _read(self, rel: bytes) -> bytes | OSError:
    try:
      with open(os.path.join(self._root, os.fsdecode(rel)), "rb") as f:
        return f.read()
    except OSError as e:  # a broken link, no permission, ...: transforms.open_image says
      return e  # which, and the pipeline replaces or masks the record out

  def key(self, index: int) -> str:
    return os.fsdecode(self._images[index])

  def __getitem__(self, index: int) -> dict:
    return {
        "image": self._read(self._images[index]),
        "label": self._read(self._annotations[index]),
        "key": self.key(index),
        "label_key": os.fsdecode(self._annotations[index]),
    }


def _shape_mask(shape: int, yy, xx, cy: float, cx: float, r: float) -> np.ndarray:
  """bool [S, S]: a disc (1), square (2), upward triangle (3) or cross (4) of radius r."""
  dy, dx = yy - cy, xx - cx
  if shape == 1:
    return dy**2 + dx**2 <= r**2
  if shape == 2:
    return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
  if shape == 3:
    return (dy <= 0.6 * r) & (np.abs(dx) <= (dy + r) / 1.6)
  return ((np.abs(dy) <= r) & (np.abs(dx) <= 0.35 * r)) | (
      (np.abs(dx) <= r) & (np.abs(dy) <= 0.35 * r)
  )


def demo_example(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """One synthetic demo example: (uint8 [S, S, 3] image, uint8 [S, S] label).

  What it is: a smooth two-colour gradient background (class 0) with 1 to 4 axis-aligned
  solid shapes on it, each a disc (1), square (2), upward triangle (3) or cross (4) of
  random radius (10-22% of the side), position and colour (kept away from the background
  colours); later shapes occlude earlier ones; Gaussian pixel noise (std 8) on top. Class is
  shape only, never colour, so a model must learn shapes. Deterministic in (seed, split,
  index); nothing is downloaded.
  """
  rng = np.random.default_rng([seed, ("train", "val").index(split), index])
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  angle = rng.uniform(0, 2 * np.pi)
  t = np.cos(angle) * xx + np.sin(angle) * yy
  t = (t - t.min()) / (t.max() - t.min())  # [S, S] in [0, 1]
  c0, c1 = rng.uniform(0, 255, (2, 3))
  image = c0 + t[..., None] * (c1 - c0)  # [S, S, 3]
  label = np.zeros((size, size), np.uint8)
  for _ in range(rng.integers(1, 5)):
    shape = int(rng.integers(1, DEMO_NUM_CLASSES))
    r = rng.uniform(0.1, 0.22) * size
    cy, cx = rng.uniform(r, size - r, 2)
    colour = rng.uniform(0, 255, 3)
    for _ in range(20):  # a colour that stands out from both background colours
      if min(np.linalg.norm(colour - c0), np.linalg.norm(colour - c1)) > 80:
        break
      colour = rng.uniform(0, 255, 3)
    mask = _shape_mask(shape, yy, xx, cy, cx, r)
    image[mask] = colour
    label[mask] = shape
  image = image + rng.normal(0, 8, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8), label


class DemoSegSource:
  """The synthetic shapes demo ('train' or 'val'), generated per index (see demo_example)."""

  def __init__(self, split: str, size: int, num_examples: int, seed: int):
    self._split, self._size, self._n, self._seed = split, size, num_examples, seed

  def __len__(self) -> int:
    return self._n

  def key(self, index: int) -> str:
    return f"shapes-{self._split}-{index}"

  def __getitem__(self, index: int) -> dict:
    image, label = demo_example(self._seed, self._split, index, self._size)
    return {"image": image, "label": label, "key": self.key(index), "label_key": self.key(index)}


def make_seg_source(cfg, split: str):
  """The source for a validated segmentation data config and split ('train' | 'val')."""
  check_split(split)
  if cfg.source == "demo":
    n = cfg.demo_num_train if split == "train" else cfg.demo_num_val
    return DemoSegSource(split, cfg.demo_image_size, n, cfg.demo_seed)
  if not cfg.root:
    raise DataNotFoundError(f"config.data.root is empty; {ADE20K_LAYOUT_HELP}")
  return ADE20KSource(cfg.root, cfg.train_split if split == "train" else cfg.val_split)
