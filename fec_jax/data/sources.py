"""Random-access sources (grain.sources.RandomAccessDataSource protocol: __len__, __getitem__).

Every source yields records {'encoded': bytes (an encoded image file), uint8 [H, W(, 3)] array
or the OSError met reading the file, 'label': int, 'key': str (file name, for error reports)}.
Decoding happens later in the pipeline's workers, so that a bad file is counted and replaced
(train) or masked out (val) there.
"""

import functools
import logging
import os
import re
from typing import NamedTuple

import numpy as np
from PIL import Image

from fec_jax import reporting

# torchvision's ImageFolder extensions (compared lower-case).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

log = logging.getLogger(__name__)

FOLDER_LAYOUT_HELP = (
    "expected a folder per class in <root>/train and <root>/val: <root>/train/<class>/*.jpg and "
    "<root>/val/<class>/*.jpg (classes sorted by folder name; config.data.root is <root>), "
    "ImageNet's layout in the official README (class folders n01440764 ...: extract "
    "ILSVRC2012_img_train.tar and its per-class tars into train/, and sort the validation images "
    "into val/<wnid>/, e.g. with the widely used valprep.sh script)"
)

IMAGENET_TFDS_HELP = (
    "ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
    "(from image-net.org) into <data_dir>/downloads/manual/, then run once: "
    "tfds build imagenet2012 --data_dir=<data_dir> --file_format=array_record "
    "(building needs `pip install tensorflow`; training only needs tensorflow-datasets "
    "and array_record)."
)
# The features TfdsSource reads, for messages.
TFDS_FEATURES = (
    "'image' (tfds.features.Image, encoded JPEG/PNG) and 'label' (tfds.features.ClassLabel)"
)
LABELLED_SPLITS = (
    "fec-jax trains and evaluates on labelled records: set config.data.train_split / "
    "config.data.val_split to a labelled split (imagenet2012's 'test' split has no labels, its "
    "'validation' split has)"
)
_VERSION = re.compile(r"\d+\.\d+\.\d+")


class DataNotFoundError(FileNotFoundError):
  """The configured data is missing or empty; the message says the expected layout."""


def check_split(split: str) -> None:
  """ValueError for a split other than 'train' and 'val', the pipelines' names of the two splits
  (split_name gives the config's name of each)."""
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def one_line(name: str) -> str:
  """A file name as a log line shows it: as it is, or where it holds a character that does not
  print (a newline split the line in two; a tab, an escape, a byte os.fsdecode could not decode),
  as Python's repr writes it, quoted and escaped."""
  return name if name.isprintable() else repr(name)


def class_folders(split_dir: str) -> tuple[str, ...]:
  """The class folders of a split, sorted by name (label i is the i-th), as torchvision's
  ImageFolder finds them."""
  return tuple(sorted(e.name for e in os.scandir(split_dir) if e.is_dir()))


class FolderScan(NamedTuple):
  """A split folder's listing (scan_folder)."""

  classes: tuple[str, ...]  # the class folders, sorted by name
  paths: np.ndarray  # bytes [N]: image paths relative to the split (os.fsencode: any file name)
  labels: np.ndarray  # int32 [N]
  skipped: tuple[str, ...]  # files in class folders without an image extension, but hidden ones
  loops: tuple[str, ...] = ()  # folders not walked again (_walk_once), relative to the split


@functools.lru_cache(maxsize=8)
def scan_folder(split_dir: str) -> FolderScan:
  """The image files in a split's class folders, at any depth, and the other files there."""
  if not os.path.isdir(split_dir):
    raise DataNotFoundError(
        f"{split_dir} is not a directory{_root_folders(split_dir)}; {FOLDER_LAYOUT_HELP}"
    )
  classes = class_folders(split_dir)
  paths, labels, others, loops = [], [], [], []
  for label, cls in enumerate(classes):
    walked, looped = _walk_once(os.path.join(split_dir, cls))
    loops += [os.path.relpath(d, split_dir) for d in looped]
    for dirpath, files in walked:
      rel = os.path.relpath(dirpath, split_dir)
      for f in sorted(files):
        if f.lower().endswith(IMG_EXTENSIONS):
          paths.append(os.path.join(rel, f))
          labels.append(label)
        elif not f.startswith("."):  # .DS_Store
          others.append(os.path.join(rel, f))
  if not paths:
    loose = _loose_images(split_dir)
    where = (
        f"{split_dir} holds {reporting.counted(len(loose), 'image')} (e.g. {loose[0]}) outside "
        f"class folders; sort them into {split_dir}/<class>/"
        if loose
        else f"no images found under {split_dir}"
    )
    raise DataNotFoundError(f"{where}; {FOLDER_LAYOUT_HELP}")
  paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
  return FolderScan(classes, paths, np.array(labels, dtype=np.int32), tuple(others), tuple(loops))


def _root_folders(split_dir: str) -> str:
  """What the root of a missing split folder holds, for the error: a split of another name
  (`valid/`, `validation/`, `test/`) or a root one level too deep (a split's class folders); or
  that the root is a file."""
  root = os.path.dirname(split_dir)
  if os.path.isfile(root):  # e.g. one of its images given as config.data.root
    return f" ({root} is a file: config.data.root is the folder of the splits)"
  try:
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
  except OSError:  # no root either
    return ""
  if not folders:
    return ""
  return (
      f" ({root} holds {reporting.listed(folders, 5)}: config.data.root is the folder of the "
      "splits, and --config.data.train_split / --config.data.val_split name them where they are "
      "not train / val)"
  )


def _walk_once(class_dir: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
  """os.walk(class_dir, followlinks=True) as (dirpath, files) sorted by dirpath, walking each real
  folder once: a folder reached again through a symbolic link (a loop such as `-> ..` or `-> .`,
  which os.walk follows until the path is too long, or a second link to one folder) or a link to
  the folder it lies in (an ancestor) is pruned, and listed in the second list. Other links,
  out of the class folder or to another class's folder (as ImageFolder does), are walked."""
  walked, looped, seen, real = [], [], set(), {class_dir: os.path.realpath(class_dir)}
  seen.add(real[class_dir])
  for dirpath, dirnames, files in os.walk(class_dir, followlinks=True):
    walked.append((dirpath, files))
    # The real folders from the class folder down to this one (os.walk names each by its parent).
    chain, d = [], dirpath
    while d in real:
      chain.append(real[d])
      d = os.path.dirname(d) if d != class_dir else None
    kept = []
    for name in sorted(dirnames):  # of two ways to one folder, the same one is kept on any disk
      path = os.path.join(dirpath, name)
      target = os.path.realpath(path)
      if target in seen or any(c.startswith(os.path.join(target, "")) for c in chain):
        looped.append(path)
      else:
        seen.add(target)
        real[path] = target
        kept.append(name)
    dirnames[:] = kept
  return sorted(walked), looped


def _loose_images(split_dir: str) -> list[str]:
  """The image files directly in a split folder, outside its class folders (sorted)."""
  return sorted(
      f
      for f in os.listdir(split_dir)
      if f.lower().endswith(IMG_EXTENSIONS) and not os.path.isdir(os.path.join(split_dir, f))
  )


@functools.lru_cache(maxsize=8)
def _warn_loose_images(split_dir: str) -> None:
  """Warns once per process and folder of the images that a split with class folders skips
  because they lie outside them (a split with none of its images in class folders is an error
  of scan_folder)."""
  loose = _loose_images(split_dir)
  if loose:
    log.warning(
        "%s: %s outside class folders skipped, e.g. %s; an image belongs in %s/<class>/",
        split_dir,
        reporting.counted(len(loose), "image"),
        one_line(loose[0]),
        split_dir,
    )


@functools.lru_cache(maxsize=8)
def _warn_other_files(split_dir: str) -> None:
  """Warns once per process and folder of the files in its class folders that scan_folder skipped
  for their extension (as torchvision's ImageFolder skips them: a .gif, .heic or .jfif photo, a
  text file), but for hidden ones (.DS_Store)."""
  skipped = scan_folder(split_dir).skipped
  if skipped:
    log.warning(
        "%s: %s in class folders without an image extension (%s, in any case) skipped, e.g. %s",
        split_dir,
        reporting.counted(len(skipped), "file"),
        " ".join(IMG_EXTENSIONS),
        one_line(skipped[0]),
    )


@functools.lru_cache(maxsize=8)
def _warn_loops(split_dir: str) -> None:
  """Warns once per process and folder of the folders that scan_folder did not walk again (a
  symbolic link loop listed each image of its class about 40 times, without a word)."""
  loops = scan_folder(split_dir).loops
  if loops:
    log.warning(
        "%s: %s in class folders to a folder already listed (a loop such as -> ..); each "
        "folder is listed once, e.g. %s is skipped",
        split_dir,
        reporting.counted(len(loops), "symbolic link"),
        one_line(loops[0]),
    )


@functools.lru_cache(maxsize=8)
def _warn_empty_classes(train_dir: str) -> None:
  """Warns once per process and folder (a run opens the train split more than once) of the
  train class folders without an image."""
  scan = scan_folder(train_dir)
  classes, labels = scan.classes, scan.labels
  empty = [c for c, n in zip(classes, np.bincount(labels, minlength=len(classes))) if n == 0]
  if empty:
    log.warning(
        "%s: %s without an image, e.g. %s; each is a class all the same (labels index the "
        "class folders)",
        train_dir,
        reporting.counted(len(empty), "class folder"),
        one_line(empty[0]),
    )


class FolderSource:
  """root/<split>/<class>/**/<image>: ImageNet's official layout or any class-folder dataset.

  Labels index the classes of the *train* split sorted by folder name (as torchvision's
  ImageFolder does; timm's reader, which the official training uses, sorts numbers within
  names by value and skips folders without images: the same order on ImageNet's wnid
  folders, not on e.g. class2 and class10), so a split missing a class keeps the train
  labels. `num_classes` must equal the number of train class folders.
  """

  def __init__(self, root: str, split: str, num_classes: int, train_split: str = "train"):
    train_dir = os.path.join(root, train_split)
    if split != train_split and not os.path.isdir(train_dir):
      raise DataNotFoundError(
          f"{train_dir} is not a directory{_root_folders(train_dir)}; the {split} labels index "
          "the train split's class folders, so they are needed to evaluate too (their images are "
          f"not); {FOLDER_LAYOUT_HELP}"
      )
    # Another split needs the train split's class folders only: an evaluation-only copy of
    # ImageNet may have them empty.
    train_classes = (
        scan_folder(train_dir).classes if split == train_split else class_folders(train_dir)
    )
    scan = scan_folder(os.path.join(root, split))
    classes, self._paths, labels = scan.classes, scan.paths, scan.labels
    _warn_loose_images(os.path.join(root, split))
    _warn_other_files(os.path.join(root, split))
    _warn_loops(os.path.join(root, split))
    if split == train_split:
      _warn_empty_classes(train_dir)
    if len(train_classes) != num_classes:
      raise ValueError(
          f"{train_dir} has {reporting.counted(len(train_classes), 'class folder')} "
          f"({reporting.listed(train_classes, 5)}) but config.data.num_classes is {num_classes}"
      )
    unknown = sorted(set(classes) - set(train_classes))
    if unknown:
      raise ValueError(
          f"{os.path.join(root, split)} has class folders that {train_dir} lacks: {unknown[:5]}; "
          "expected the train split's class names (case included)"
      )
    to_train = np.array([train_classes.index(c) for c in classes], dtype=np.int32)
    self._labels = to_train[labels]
    self._dir = os.path.join(root, split)
    self.classes = train_classes

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict:
    rel = os.fsdecode(self._paths[index])
    try:
      with open(os.path.join(self._dir, rel), "rb") as f:
        encoded = f.read()
    except OSError as e:  # a broken link, no permission, ...: transforms.decode says which,
      encoded = e  # and the pipeline replaces or masks the record out
    return {"encoded": encoded, "label": int(self._labels[index]), "key": rel}


def _versions(folder: str) -> list[str]:
  """The prepared versions in a TFDS dataset folder: version folders with a dataset_info.json."""
  found = (
      v
      for v in os.listdir(folder)
      if _VERSION.fullmatch(v) and os.path.isfile(os.path.join(folder, v, "dataset_info.json"))
  )
  return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def tfds_data_dir(data_dir: str) -> str:
  """The folder TFDS reads for `data_dir`: itself, or where it is '' TFDS's default
  ($TFDS_DATA_DIR where it was set when TFDS was imported, else ~/tensorflow_datasets)."""
  import tensorflow_datasets as tfds

  return os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)


def recorded_fields(data_config) -> dict[str, str]:
  """The config.data fields a run's config.json records otherwise than as given:
  {'data.tfds_data_dir': the folder TFDS reads} where the source is 'tfds' and tfds_data_dir is
  '' (TFDS's default, $TFDS_DATA_DIR), so that a later command without the variable reads the
  same data, or starts with '~' (expanded, not a folder '~' of the current directory); else {}
  (also for a task's config without fec_jax.data's fields)."""
  if data_config is None or data_config.get("source") != "tfds":
    return {}
  given = data_config.get("tfds_data_dir", "unset")
  if given != "" and not (isinstance(given, str) and given.startswith("~")):  # None from Python
    return {}
  return {"data.tfds_data_dir": tfds_data_dir(given)}


def tfds_builder(name: str, data_dir: str = ""):
  """The builder of TFDS dataset `name` ('name[/config][:version]') prepared in `data_dir` ('' =
  TFDS's default), read from its dataset_info.json (no record is read); DataNotFoundError saying
  what is wrong where it is not prepared there."""
  import tensorflow_datasets as tfds

  root = tfds_data_dir(data_dir)
  base, _, version = name.partition(":")
  folder = os.path.join(root, base)
  expected = f"expected {os.path.join(root, base, '<version>', 'dataset_info.json')}"
  if not os.path.isdir(folder):
    if os.path.isfile(os.path.join(root, "dataset_info.json")):
      raise DataNotFoundError(
          f"TFDS data_dir {root!r} is a dataset's version folder (it holds dataset_info.json): "
          f"give the folder that holds the dataset's folder, "
          f"--config.data.tfds_data_dir={os.path.dirname(os.path.dirname(root))}"
      )
    own_versions = _versions(root) if os.path.isdir(root) else []
    if own_versions:
      raise DataNotFoundError(
          f"TFDS data_dir {root!r} is a dataset's own folder (it holds the version folders "
          f"{', '.join(own_versions)}): give its parent, "
          f"--config.data.tfds_data_dir={os.path.dirname(root)}"
      )
    if not os.path.isdir(root):
      there = "it does not exist"
    else:
      found = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name != "downloads")
      there = f"it holds the datasets {', '.join(found)}" if found else "it holds no dataset"
    how = (
        IMAGENET_TFDS_HELP if base == "imagenet2012" else expected + ", as a TFDS build writes it."
    )
    raise DataNotFoundError(f"TFDS {base} was not found in data_dir {root!r} ({there}); {how}")
  versions = _versions(folder)
  held = f"it holds the versions {', '.join(versions)}" if versions else "it holds none"
  if version and version not in versions:
    raise DataNotFoundError(
        f"TFDS {base} has no version {version} in {folder} ({held}): set "
        f"config.data.tfds_name to {base}:<version> of one there, or to {base} for its latest"
    )
  try:
    builder = tfds.builder(name, data_dir=root)
  except Exception as e:  # TFDS's DatasetNotFoundError, AssertionError, ...: one line of it
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataNotFoundError(
        f"TFDS could not open {name} in {folder} ({held}; {expected}): {cause}"
    ) from e
  if not builder.is_prepared():
    raise DataNotFoundError(
        f"TFDS {base} {builder.version} is not prepared in {folder} ({held}; {expected}): "
        f"build it, or set config.data.tfds_name to {base}:<version> of one there"
    )
  return builder


class TfdsSource:
  """A TFDS dataset read with tfds.data_source (array_record), images left encoded.

  The dataset must have the features TFDS_FEATURES; `num_classes` must equal the classes of its
  'label'. All is checked from its dataset_info before a record is read; then record 0 is read:
  labelled -1 (ClassLabel's "no label"), the split is unlabelled, DataNotFoundError on every
  process. Another record labelled -1 is a ValueError when read: one process's alone (several
  processes each read their share), which the loop must not take for an error of all.
  """

  def __init__(self, name: str, split: str, data_dir: str, num_classes: int):
    import tensorflow_datasets as tfds

    builder = tfds_builder(name, data_dir)
    info, where = builder.info, builder.data_dir
    features = dict(info.features.items())
    has = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in features.items())
    if not (
        isinstance(features.get("image"), tfds.features.Image)
        and isinstance(features.get("label"), tfds.features.ClassLabel)
    ):
      raise ValueError(
          f"TFDS {name} ({where}) has the features {has}; fec-jax reads {TFDS_FEATURES} "
          "(a ClassLabel gives the number of classes checked against config.data.num_classes)"
      )
    classes = features["label"].num_classes
    if classes != num_classes:
      raise ValueError(
          f"TFDS {name} has {classes} classes but config.data.num_classes is {num_classes}"
      )
    if tfds.core.file_adapters.FileFormat.ARRAY_RECORD not in info.available_file_formats():
      formats = ", ".join(sorted(f.value for f in info.available_file_formats()))
      raise DataNotFoundError(
          f"TFDS {name} in {where} was prepared as {formats}; fec-jax reads array_record "
          "(random access): build it again into another data_dir (or after deleting "
          f"{where}) with `tfds build {name.partition(':')[0]} --data_dir=<data_dir> "
          "--file_format=array_record`, or with file_format='array_record' given to the builder"
      )
    try:
      num_records = info.splits[split].num_examples
    except (KeyError, ValueError) as e:  # TFDS: ValueError "Unknown split 'val'. Should be ..."
      raise DataNotFoundError(
          f"TFDS {name} has no split {split!r}: its splits are {', '.join(info.splits)}; set "
          "config.data.train_split / config.data.val_split to one of them"
      ) from e
    if num_records == 0:
      raise DataNotFoundError(f"split {split!r} of TFDS {name} ({where}) holds no record")
    self._ds = builder.as_data_source(
        split=split,
        decoders={"image": tfds.decode.SkipDecoding()},
        file_format=tfds.core.file_adapters.FileFormat.ARRAY_RECORD,
    )
    self._split = f"split {split!r} of TFDS {name} ({where})"
    if int(self._ds[0]["label"]) < 0:  # here, before train.py compiles a step
      raise DataNotFoundError(
          f"{self._split} is not labelled (its first record's label is -1, ClassLabel's \"no "
          f'label"); {LABELLED_SPLITS}'
      )

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict:
    rec = self._ds[index]
    key = rec.get("file_name", str(index))
    key = key.decode() if isinstance(key, bytes) else str(key)
    label = int(rec["label"])
    if label < 0:  # ClassLabel's "no label" in a split whose first record has one
      raise ValueError(f"record {key} of {self._split} has no label (-1); {LABELLED_SPLITS}")
    return {"encoded": rec["image"], "label": label, "key": key}


@functools.lru_cache(maxsize=4)
def demo_arrays(image_size: int, val_fraction: float, split: str):
  """scikit-learn digits (1,797 8x8, 10 classes) -> uint8 [N, S, S, 3], int32 [N].

  0-16 ink is scaled to 0-255 and upscaled bilinearly to S x S. The held-out split is
  a stratified `val_fraction` of each class by a fixed permutation (seed 0); a fraction that
  leaves a split empty is a ValueError.
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  perm = np.random.default_rng(0).permutation(len(digits.target))
  is_val = np.zeros(len(perm), bool)
  for c in range(10):
    members = perm[digits.target[perm] == c]
    is_val[members[: int(round(len(members) * val_fraction))]] = True
  keep = np.sort(np.nonzero(is_val if split == "val" else ~is_val)[0])
  if not len(keep):  # each class holds 174 to 183 digits: a fraction within about 0.003 of 0 or 1
    raise ValueError(
        f"config.data: demo_val_fraction {val_fraction} leaves the demo's {split} split empty "
        f"(each class's {split} share of its about 180 digits rounds to 0); expected a fraction "
        "that leaves both splits some, e.g. 0.2 (the default)"
    )
  small = (digits.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)
  big = np.stack(
      [
          np.asarray(Image.fromarray(a).resize((image_size, image_size), Image.Resampling.BILINEAR))
          for a in small
      ]
  )
  return np.repeat(big[..., None], 3, axis=-1), digits.target[keep].astype(np.int32)


class DemoSource:
  """The bundled digits demo ('train' or 'val'), see demo_arrays."""

  def __init__(self, split: str, image_size: int, val_fraction: float):
    if split not in ("train", "val"):
      raise ValueError(
          f"the demo's splits are 'train' and 'val', got {split!r} (config.data.train_split, "
          "val_split)"
      )
    self._images, self._labels = demo_arrays(image_size, val_fraction, split)

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict:
    return {
        "encoded": self._images[index],
        "label": int(self._labels[index]),
        "key": f"digit-{index}",
    }


def split_name(cfg, split: str) -> str:
  """Config split name for 'train' / 'val' (see config: train_split, val_split); `cfg` a
  ConfigDict or the data section of a run's config.json."""
  check_split(split)
  name = cfg.get(f"{split}_split")
  if name:
    return name
  return "validation" if (cfg.get("source") == "tfds" and split == "val") else split


def split_holding(cfg, path: str) -> tuple[str, str] | None:
  """('train' or 'val', the split's folder) where `path` lies in a split folder of class-folder
  data (`cfg`: a ConfigDict or the data section of a run's config.json): every folder there is a
  class and every image under a class folder one of its examples, so files written at `path`
  would be read as data (a folder made there a class of its own); None otherwise. The path as
  named counts as well as its real path: a class folder that is a symbolic link
  (train/linked -> elsewhere) leads a train/linked/run to elsewhere/run, which its own real path
  does not show to be in the split; each of its folders is resolved in turn."""
  if cfg.get("source") != "folder" or not cfg.get("root"):
    return None
  named, real = os.path.abspath(path), []
  while True:
    real.append(os.path.realpath(named))  # of the path, then of each folder above it
    if os.path.dirname(named) == named:
      break
    named = os.path.dirname(named)
  for split in ("train", "val"):
    folder = os.path.realpath(os.path.join(cfg.get("root"), split_name(cfg, split)))
    if any(os.path.commonpath([r, folder]) == folder for r in real):
      return split, folder
  return None


def make_source(cfg, split: str):
  """The source for a validated data config and split ('train' | 'val')."""
  name = split_name(cfg, split)
  if cfg.source == "folder":
    if not cfg.root:
      raise DataNotFoundError(f"config.data.root is empty; {FOLDER_LAYOUT_HELP}")
    return FolderSource(cfg.root, name, cfg.num_classes, split_name(cfg, "train"))
  if cfg.source == "tfds":
    return TfdsSource(cfg.tfds_name, name, cfg.tfds_data_dir, cfg.num_classes)
  if cfg.num_classes != 10:
    raise ValueError("the demo (digits) has 10 classes; set config.data.num_classes = 10")
  return DemoSource(name, cfg.demo_image_size, cfg.demo_val_fraction)
