"""The recipe's float ops, on device: normalization and the random erasing fill.

The loader ships uint8 images and, for training, one random erasing box per image drawn
on the host with timm's draws (transforms.erase_params). Doing the per-pixel float work
here, jitted on each device's shard, takes it off the host cores that decode and
augment, and moves 4x fewer bytes between worker processes and to the device.
"""

import jax
import jax.numpy as jnp


def normalize(images, mean, std):
  """uint8 (or float values in [0, 255]) [..., 3] -> float32 (x / 255 - mean) / std:
  torchvision ToTensor + Normalize."""
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def in_boxes(h: int, w: int, top, left, height, width):
  """[B, H, W, 1] bool: which pixels of an H x W map lie in each image's box; top, left, height,
  width int [B, 1] (a zero size: no pixel)."""
  rows = (jnp.arange(h) >= top) & (jnp.arange(h) < top + height)  # [B, H]
  cols = (jnp.arange(w) >= left) & (jnp.arange(w) < left + width)  # [B, W]
  return rows[:, :, None, None] & cols[:, None, :, None]


def erase(key, images, boxes, mode: str):
  """timm RandomErasing's fill of normalized images [B, H, W, C] in the boxes [B, 4] int32
  (top, left, h, w; zero size: untouched). mode 'pixel': per-pixel N(0, 1); 'rand':
  per-channel N(0, 1); 'const': zeros (docs/official-code.md Sec. 8: pixel, after normalization)."""
  b, h, w, c = images.shape
  inside = in_boxes(h, w, *(boxes[:, i, None] for i in range(4)))  # [B, H, W, 1]
  if mode == "pixel":
    fill = jax.random.normal(key, images.shape, images.dtype)
  elif mode == "rand":
    fill = jax.random.normal(key, (b, 1, 1, c), images.dtype)
  elif mode == "const":
    fill = jnp.zeros((), images.dtype)
  else:
    raise ValueError(f"random erasing mode must be 'pixel', 'rand' or 'const', got {mode!r}")
  return jnp.where(inside, fill, images)
