"""A tiny generated ADEChallengeData2016-layout folder for tests.

root/images/{training,validation}/ADE_{train,val}_%08d.jpg and
root/annotations/{training,validation}/ADE_{train,val}_%08d.png (8-bit, 0 = 'other').
"""

import os

import numpy as np
from PIL import Image

SPLITS = (("training", "train"), ("validation", "val"))


def make_ade20k_folder(
    root,
    num_train: int = 6,
    num_val: int = 3,
    num_classes: int = 5,
    seed: int = 0,
    sizes=((48, 64), (64, 48), (40, 40)),
) -> str:
  """Writes the folder and returns str(root). Image sizes (height, width) cycle through `sizes`
  (multiples of 8); each annotation is a grid of 8x8 blocks of random labels in 0..num_classes,
  and each image is its label's colour plus noise. Deterministic per seed."""
  rng = np.random.default_rng(seed)
  palette = rng.integers(0, 256, (num_classes + 1, 3))
  for (folder, prefix), count in zip(SPLITS, (num_train, num_val)):
    os.makedirs(os.path.join(root, "images", folder), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", folder), exist_ok=True)
    for i in range(count):
      h, w = sizes[i % len(sizes)]
      blocks = rng.integers(0, num_classes + 1, (h // 8, w // 8))
      label = np.kron(blocks, np.ones((8, 8), np.int64)).astype(np.uint8)  # [h, w]
      image = np.clip(palette[label] + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
      name = f"ADE_{prefix}_{i + 1:08d}"
      Image.fromarray(image).save(os.path.join(root, "images", folder, name + ".jpg"), quality=95)
      Image.fromarray(label).save(os.path.join(root, "annotations", folder, name + ".png"))
  return str(root)
