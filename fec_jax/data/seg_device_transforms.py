"""On-device normalization of padded segmentation batches.

mmseg normalizes the cropped image and then pads it with 0, so the padding is 0 after
normalization. The loader ships uint8 images padded with 0 and the unpadded size of each;
this restores mmseg's zeros after fec_jax.data.device_transforms.normalize.
"""

import jax.numpy as jnp

from fec_jax.data import device_transforms


def normalize(images, valid, mean, std):
  """uint8 [B, H, W, 3] and int32 [B, 2] valid (height, width) at the top left ->
  float32 [B, H, W, 3]: (x / 255 - mean) / std inside, 0 in the padding."""
  _, h, w, _ = images.shape
  x = device_transforms.normalize(images, mean, std)  # [B, H, W, 3]
  inside = device_transforms.in_boxes(h, w, 0, 0, valid[:, 0, None], valid[:, 1, None])
  return jnp.where(inside, x, 0.0)
