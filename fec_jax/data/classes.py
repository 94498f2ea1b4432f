"""Class names in label order, for eval.py's per-class table and the pictures of visualize.py
and visualize_seg.py.

imagenet_classes.txt (1000 lines) was generated once from timm 1.0.31's wheel: the wnids of
`timm/data/_info/imagenet_synsets.txt` (sorted), each replaced by its lemmas from
`timm/data/_info/imagenet_synset_to_lemma.txt` (e.g. 'tench, Tinca tinca').
ade20k_classes.txt ("R G B name" lines) was written once from mmseg 0.24's
ADE20KDataset.CLASSES and PALETTE ('bed ' without its trailing space).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from importlib import resources
from typing import NamedTuple

import numpy as np

from fec_jax.data.loader import data_location
from fec_jax.data.seg_config import DEMO_CLASS_NAMES
from fec_jax.data.sources import DataNotFoundError, class_folders, split_name, tfds_builder


def _read(name: str) -> list[str]:
  return resources.files("fec_jax.data").joinpath(name).read_text(encoding="utf-8").splitlines()


@functools.cache
def imagenet_names() -> tuple[str, ...]:
  """The 1000 ImageNet-1k class names in the standard sorted-wnid order; `[1]` is 'goldfish,
  Carassius auratus'."""
  return tuple(_read("imagenet_classes.txt"))


@functools.cache
def ade20k() -> tuple[tuple[str, ...], np.ndarray]:
  """ADE20K's 150 class names (after reduce_zero_label: label 0 is 'wall') and mmseg's colours
  for them, uint8 [150, 3]."""
  rows = [line.split(" ", 3) for line in _read("ade20k_classes.txt")]
  palette = np.array([[int(v) for v in row[:3]] for row in rows], np.uint8)  # [150, 3]
  return tuple(row[3] for row in rows), palette


def classification_names(
    cfg, num_classes: int, recorded: tuple[str, ...] | None = None
) -> tuple[str, ...] | None:
  """The names of a classifier's classes from the data config of its run (a ConfigDict, or the
  data section of a run's config.json): a folder run's class folders where they still are, a
  TFDS run's ClassLabel names where its dataset_info still is, unless these are ImageNet's wnids;
  the demo's digits; ImageNet's names for 1000 classes; else the wnids themselves (a subset of
  ImageNet's classes). None where they are not known. `recorded`: the names the run's data gave
  its labels when it started (its classes.json), taken instead of the data's own now."""
  own = own_names(cfg) if recorded is None else recorded
  own = own if own and len(own) == num_classes else None
  if own and not all(re.fullmatch(r"n\d{8}", c) for c in own):
    return own
  if cfg.get("source") == "demo" and num_classes == 10:
    return tuple(f"digit {i}" for i in range(10))
  return imagenet_names() if num_classes == 1000 else own


def own_names(cfg) -> tuple[str, ...] | None:
  """A run's own class names, whatever their number: a folder run's class folders, a TFDS run's
  ClassLabel names; None where they are not found (moved, unreadable, a root '': none is read)
  or the source has none."""
  if cfg.get("source") == "folder":
    if not cfg.get("root"):  # not the working directory's train/: the data's own error says so
      return None
    train_dir = _train_folder(cfg)
    return class_folders(train_dir) if os.path.isdir(train_dir) else None
  if cfg.get("source") == "tfds" and cfg.get("tfds_name"):
    return _tfds_label_names(cfg.get("tfds_name"), cfg.get("tfds_data_dir") or "")
  return None


def _train_folder(cfg) -> str:
  """A folder run's train split, whose class folders name its classes."""
  return os.path.join(cfg.get("root") or "", split_name(cfg, "train"))


def own_names_origin(cfg) -> str | None:
  """Where classification_names reads a run's own class names, for a note where they are gone:
  its class folders or its TFDS dataset_info; None for the other sources (no names of their own)."""
  if cfg.get("source") == "folder":
    return f"class folders in {os.path.abspath(_train_folder(cfg))}"
  if cfg.get("source") == "tfds":
    return f"label names of {data_location(cfg)}"
  return None


class LabelNames(NamedTuple):
  """The names a run's data gives its labels (label_names): label i is names[i]."""

  names: tuple[str, ...]
  origin: str  # where they are read (own_names_origin), e.g. 'class folders in /data/pets/train'


def label_names(cfg) -> LabelNames | None:
  """own_names of a data config, with where they are read; None where own_names is."""
  names = own_names(cfg)
  return None if names is None else LabelNames(names, own_names_origin(cfg))


def label_names_change(then: LabelNames, now: LabelNames) -> str | None:
  """The first label whose name differs between a run's start (`then`) and its data now: e.g.
  "label 0 is 'dog' in the class folders in /data/train now, 'Dog' when the run started". Labels
  index the names (a folder run's class folders sorted), so the run's classes would be others
  under its labels. None where the names are the same."""
  if then.names == now.names:
    return None
  pairs = itertools.zip_longest(then.names, now.names)
  i = next(i for i, (a, b) in enumerate(pairs) if a != b)
  name = lambda names: repr(names[i]) if i < len(names) else "no class"
  there = "" if then.origin == now.origin else f" in the {then.origin}"
  return (
      f"label {i} is {name(now.names)} in the {now.origin} now, {name(then.names)}{there} when "
      "the run started"
  )


def _tfds_label_names(name: str, data_dir: str) -> tuple[str, ...] | None:
  """The names of a TFDS dataset's 'label' ClassLabel, read from its dataset_info (no record):
  'class 0', ... for one of num_classes only (not ImageNet's); None where it is not readable here
  (moved, or tensorflow_datasets not installed)."""
  try:
    import tensorflow_datasets as tfds

    label = dict(tfds_builder(name, data_dir).info.features.items()).get("label")
  except (ImportError, DataNotFoundError):
    return None
  if not isinstance(label, tfds.features.ClassLabel):
    return None
  names = tuple(label.names)
  return numbered(len(names)) if names == tuple(map(str, range(len(names)))) else names


def is_ade20k(cfg) -> bool:
  """Whether a segmentation data config's classes are ADE20K's 150 (no class_names given)."""
  return not cfg.class_names and cfg.source == "ade20k" and cfg.num_classes == 150


def segmentation_names(cfg) -> tuple[str, ...]:
  """The names of a segmentation data config's classes: config.data.class_names, else
  ADE20K's (is_ade20k), the demo's, or 'class 0', 'class 1', ..."""
  if cfg.class_names:
    return tuple(cfg.class_names)
  if is_ade20k(cfg):
    return ade20k()[0]
  if cfg.source == "demo":
    return DEMO_CLASS_NAMES
  return numbered(cfg.num_classes)


def numbered(num_classes: int) -> tuple[str, ...]:
  """'class 0', 'class 1', ...: the names of classes with none known."""
  return tuple(f"class {i}" for i in range(num_classes))
