"""ImageNet-1k class names, index = label in the standard sorted-wnid order.

imagenet_classes.txt (1000 lines) was generated once from timm 1.0.31's wheel: the wnids of
`timm/data/_info/imagenet_synsets.txt` (sorted), each replaced by its lemmas from
`timm/data/_info/imagenet_synset_to_lemma.txt` (e.g. 'tench, Tinca tinca').
"""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
  """The 1000 class names; `imagenet_class_names()[1]` is 'goldfish, Carassius auratus'."""
  text = resources.files("fec_jax").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
  return tuple(text.splitlines())
