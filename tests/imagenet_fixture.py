"""A tiny generated ImageNet-layout folder for tests (root/{train,val}/<wnid>/*.JPEG)."""

import os

import numpy as np
from PIL import Image

WNIDS = (
    "n01440764",
    "n01443537",
    "n01484850",
    "n01491361",
    "n01494475",
    "n01496331",
    "n01498041",
    "n01514668",
    "n01514859",
    "n01518878",
)


def make_imagenet_folder(
    root,
    num_classes: int = 3,
    per_class: int = 4,
    size=(64, 80),
    val_per_class: int = 2,
    seed: int = 0,
) -> str:
  """Writes root/train/<wnid>/<wnid>_<i>.JPEG and root/val/<wnid>/..., returns str(root).

  Each class has its own base colour (class c is learnable from colour), plus noise;
  `size` is (height, width). Deterministic for a given seed.
  """
  if num_classes > len(WNIDS):
    raise ValueError(f"at most {len(WNIDS)} classes")
  rng = np.random.default_rng(seed)
  h, w = size
  for split, count in (("train", per_class), ("val", val_per_class)):
    for c, wnid in enumerate(WNIDS[:num_classes]):
      d = os.path.join(root, split, wnid)
      os.makedirs(d, exist_ok=True)
      base = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 181 + 160) % 256])
      for i in range(count):
        img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{wnid}_{i}.JPEG"), quality=90)
  return str(root)
