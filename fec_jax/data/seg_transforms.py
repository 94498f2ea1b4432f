"""Host-side segmentation ops of the authors' ADE20K recipe (mmsegmentation 0.24), numpy/cv2.

Images are uint8 RGB [H, W, 3] and labels uint8 [H, W]. mmseg works in BGR; every op here
is channel-order independent except the HSV conversions, which use cv2's RGB<->HSV codes
(the same formulas as mmseg's BGR<->HSV with the channels swapped), so the pixels match.
Resizing uses cv2 as mmcv.imresize does (images INTER_LINEAR, labels INTER_NEAREST):
PIL's bilinear filter antialiases when it shrinks an image and cv2's does not, so PIL
would give other pixels.

Every op that draws random numbers takes an `rng` with the methods of
`np.random.Generator` (`random`, `integers`, `uniform`) and draws in the order mmseg's code
draws from `numpy.random` (`random_sample`, `randint`, `rand`, `uniform`), so that tests
can replay one stream through both. `randint(a, b)` and `integers(a, b)` both exclude b.
The host ships uint8 images; normalization (after which mmseg pads with 0) runs on device
(seg_device_transforms.normalize).
"""

import cv2
import numpy as np

from fec_jax.data import transforms

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")  # Pillow's modes of a 16-bit PNG ('I': older Pillow)


def decode_label(encoded) -> np.ndarray:
  """A PNG annotation (bytes) or uint8 [H, W] array -> uint8 [H, W] class indices, as mmseg's
  LoadAnnotations reads it (Pillow, 'unchanged', then astype(uint8): palette images give their
  indices, a 1-bit PNG, a binary mask saved from a bool array, ids 0 and 1, a 16-bit PNG its
  values).
  Raises transforms.BadImageError for an unreadable file (an OSError in place of the bytes),
  corrupt data, a multi-channel map or a 16-bit one with values above 255 (which astype(uint8)
  would wrap: id 256 read as 0)."""
  if isinstance(encoded, np.ndarray):
    return encoded
  img = transforms.open_image(encoded)
  if img.mode in SIXTEEN_BIT:
    ids = np.asarray(img)  # [H, W] uint16 or int32
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise transforms.BadImageError(
          f"mode {img.mode} with values up to {ids.max()}; expected class ids 0..255 (an 8-bit "
          "id as mmseg reads it: astype(uint8) would wrap a larger one)"
      )
    return ids.astype(np.uint8)
  if img.mode not in ("L", "P", "1"):
    raise transforms.BadImageError(
        f"mode {img.mode}; expected a single-channel PNG of class ids ('L' or 'P'; or 1-bit, ids "
        "0 and 1; or 16-bit, ids up to 255)"
    )
  return np.asarray(img, np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """0 ('other') -> 255, k -> k - 1 (mmseg LoadAnnotations(reduce_zero_label=True); 255 stays)."""
  out = label.copy()
  out[out == 0] = 255
  out = out - 1
  out[out == 254] = 255
  return out


def unknown_ids(label: np.ndarray, cfg) -> list[int]:
  """The ids of an annotation [H, W] (with cfg.reduce_zero_label applied) that are neither a
  class (< cfg.num_classes) nor cfg.ignore_index, as the file stores them: reduce_zero_label,
  which needs ignore_index 255, took 1 off each."""
  ids = np.unique(label[(label >= cfg.num_classes) & (label != cfg.ignore_index)])
  return [int(i) + bool(cfg.reduce_zero_label) for i in ids]


def expected_ids(cfg) -> str:
  """The ids cfg's annotations may hold, as the files store them, for messages."""
  k = cfg.num_classes
  if cfg.reduce_zero_label:
    classes = f"0 ('other'), 1..{k} (config.data.num_classes {k} with reduce_zero_label)"
  else:
    classes = f"0..{k - 1} (config.data.num_classes {k})"
  return f"{classes} or {cfg.ignore_index} (ignore_index)"


def rescale_size(height: int, width: int, scale) -> tuple[int, int]:
  """mmcv.rescale_size for a (long, short) tuple `scale`: the keep-ratio (new_h, new_w)."""
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def resize(array: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
  """mmcv.imresize with the cv2 backend: bilinear (INTER_LINEAR) or nearest (INTER_NEAREST)."""
  interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
  return cv2.resize(array, (width, height), interpolation=interpolation)


def random_scale(rng, img_scale, ratio_range) -> tuple[int, int]:
  """mmseg Resize.random_sample_ratio: img_scale times a uniform ratio, sides truncated."""
  ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
  return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


def check_rescale(height: int, width: int, scale, named: str = "") -> None:
  """transforms.BadImageError where the keep-ratio resize of a height x width image to `scale`
  (rescale_size) has a side of 0 pixels, which cv2 cannot make (nor mmseg, whose cv2 resize fails
  the same): an image much thinner than `scale`, e.g. 1 pixel high and 200 wide at (64, 64).
  `named`: what the error calls the scale (by default, img_scale)."""
  h, w = rescale_size(height, width, scale)
  if min(h, w) < 1:
    named = named or f"img_scale {tuple(scale)}"
    raise transforms.BadImageError(
        f"{width}x{height} pixels, {w}x{h} after the keep-ratio resize to {named}: a side of 0 "
        f"pixels, which cv2 cannot make (an image at most {2 * max(scale)} times as wide as "
        "high, or as high as wide, can be resized so)"
    )


def smallest_scale(cfg) -> tuple[int, int]:
  """The smallest scale the train resize draws (random_scale at ratio_range's low end)."""
  return tuple(int(side * cfg.ratio_range[0]) for side in cfg.img_scale)


def rescale(image: np.ndarray, label, scale):
  """mmseg Resize(keep_ratio=True) to `scale` (long, short): image bilinear, label nearest;
  check_rescale's error for an image too thin for it."""
  check_rescale(image.shape[0], image.shape[1], scale)
  h, w = rescale_size(image.shape[0], image.shape[1], scale)
  image = resize(image, h, w)
  if label is not None:
    label = resize(label, h, w, nearest=True)
  return image, label


def crop_bbox(rng, height: int, width: int, crop_size) -> tuple[int, int, int, int]:
  """mmseg RandomCrop.get_crop_bbox: (y1, y2, x1, x2) of a crop_size (h, w) box."""
  offset_h = int(rng.integers(0, max(height - crop_size[0], 0) + 1))
  offset_w = int(rng.integers(0, max(width - crop_size[1], 0) + 1))
  return offset_h, offset_h + crop_size[0], offset_w, offset_w + crop_size[1]


def random_crop(rng, image, label, crop_size, cat_max_ratio: float, ignore_index: int):
  """mmseg RandomCrop: while one class covers >= cat_max_ratio of the crop's non-ignored
  pixels (or it has fewer than 2 classes), redraw; after 10 checks the 11th box is taken
  unchecked. np.bincount gives np.unique's counts of uint8 labels without sorting."""
  y1, y2, x1, x2 = crop_bbox(rng, image.shape[0], image.shape[1], crop_size)
  if cat_max_ratio < 1.0:
    for _ in range(10):
      counts = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=256)
      counts[ignore_index] = 0
      counts = counts[counts > 0]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      y1, y2, x1, x2 = crop_bbox(rng, image.shape[0], image.shape[1], crop_size)
  return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def random_flip(rng, image, label, prob: float):
  """mmseg RandomFlip(prob), horizontal: one draw `rand() < prob`."""
  if rng.random() < prob:
    return image[:, ::-1], label[:, ::-1]
  return image, label


def _convert(x: np.ndarray, alpha=1.0, beta=0.0) -> np.ndarray:
  """PhotoMetricDistortion.convert: float32 x * alpha + beta, clipped, truncated to uint8."""
  return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(
      np.uint8
  )


def photometric_distortion(
    rng, image, brightness_delta, contrast_range, saturation_range, hue_delta
):
  """mmseg 0.24 PhotoMetricDistortion on uint8 RGB [H, W, 3]: brightness; mode = randint(2);
  contrast if mode == 1; saturation; hue; contrast if mode == 0. Each op applies when its
  own randint(2) is 1 and then draws its amount; after brightness, contrast and saturation the
  result is clipped and truncated to uint8, the hue wraps around; saturation and hue go through
  cv2's 8-bit HSV (H in [0, 180))."""
  if rng.integers(2):
    image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
  mode = rng.integers(2)

  def contrast(img):
    if rng.integers(2):
      return _convert(img, alpha=rng.uniform(*contrast_range))
    return img

  if mode == 1:
    image = contrast(image)
  if rng.integers(2):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(*saturation_range))
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.integers(2):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-hue_delta, hue_delta)) % 180
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if mode == 0:
    image = contrast(image)
  return image


def pad(image, label, size, ignore_index: int):
  """mmseg Pad(size) at the bottom and right: image with 0, label with ignore_index.
  Returns (uint8 [h, w, 3], uint8 [h, w], int32 [2] the unpadded (height, width))."""
  h, w = image.shape[:2]
  rows, cols = size[0] - h, size[1] - w
  image = np.pad(image, ((0, rows), (0, cols), (0, 0)))
  label = np.pad(label, ((0, rows), (0, cols)), constant_values=ignore_index)
  return image, label, np.array([h, w], np.int32)


def train_transform(rng, image: np.ndarray, label: np.ndarray, cfg):
  """The host part of the authors' train pipeline, uint8 [H, W, 3] and [H, W] (labels
  already reduced) -> (uint8 [ch, cw, 3], uint8 [ch, cw], int32 [2] valid (h, w)), with
  (ch, cw) = crop_size: Resize(img_scale, ratio_range, keep_ratio) -> RandomCrop(crop_size,
  cat_max_ratio) -> RandomFlip -> PhotoMetricDistortion -> (Normalize on device) -> Pad."""
  image, label = rescale(image, label, random_scale(rng, cfg.img_scale, cfg.ratio_range))
  image, label = random_crop(rng, image, label, cfg.crop_size, cfg.cat_max_ratio, cfg.ignore_index)
  image, label = random_flip(rng, image, label, cfg.flip_prob)
  if cfg.photometric:
    image = photometric_distortion(
        rng,
        np.ascontiguousarray(image),
        cfg.brightness_delta,
        cfg.contrast_range,
        cfg.saturation_range,
        cfg.hue_delta,
    )
  return pad(image, label, cfg.crop_size, cfg.ignore_index)


def eval_transform(image: np.ndarray, cfg) -> np.ndarray:
  """The authors' test resize (AlignResize(keep_ratio=True, size_divisor)): keep-ratio
  bilinear resize to img_scale, then a second bilinear resize to the sides rounded up to
  multiples of size_divisor. uint8 [H, W, 3] -> uint8 [h, w, 3]."""
  image, _ = rescale(image, None, cfg.img_scale)
  d = cfg.size_divisor
  h, w = -(-image.shape[0] // d) * d, -(-image.shape[1] // d) * d
  return resize(image, h, w)
