"""Host-side image ops of the official recipe (reference section 8), numpy/PIL.

Every op that draws random numbers takes an `rng` with the methods of
`np.random.Generator` (`random`, `uniform`, `integers`, `normal`) and draws them in
the same order as timm's code draws from Python's `random`, so that tests can
replay one stream of uniforms through both implementations.

Images are PIL images until `normalize`, then float32 HWC arrays.
"""

import io
import math

import numpy as np
from PIL import Image

from fec_jax.data import randaugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm's RandomResizedCropAndInterpolation picks one of these per image for 'random'.
RANDOM_INTERPOLATION = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class BadImageError(ValueError):
  """The bytes of a record are not a decodable image."""


def decode(encoded) -> tuple[Image.Image, bool]:
  """Decodes an encoded image (bytes) or a uint8 HW/HWC array to an RGB PIL image.

  Returns (image, converted) where `converted` says the input was not 8-bit RGB
  (grayscale, palette, CMYK, RGBA, 16-bit, ...). Raises BadImageError for empty,
  truncated or corrupt data. 16-bit images are scaled to 8 bits (PIL's own
  convert('RGB') would clip them to white); other modes use PIL's convert('RGB'),
  as torchvision's ImageFolder loader does (alpha is dropped, CMYK converted naively).
  """
  if isinstance(encoded, np.ndarray):
    return Image.fromarray(encoded).convert("RGB"), encoded.ndim != 3
  try:
    img = Image.open(io.BytesIO(encoded))
    img.load()
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
    raise BadImageError(f"{type(e).__name__}: {e}") from e
  if img.mode == "RGB":
    return img, False
  if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    arr = np.asarray(img, dtype=np.float64)
    scale = 257.0 if img.mode.startswith("I;16") or arr.max() > 255 else 1.0
    img = Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8))
  return img.convert("RGB"), True


def rrc_params(rng, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
  """Random resized crop box (top, left, h, w): timm RandomResizedCropAndInterpolation.get_params."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = rng.uniform(*scale) * area
    aspect_ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if w <= width and h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height  # fallback: central crop at the nearest allowed ratio
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def pick_interpolation(rng, name: str):
  """PIL resample filter; 'random' draws bilinear or bicubic (timm's random.choice)."""
  if name == "random":
    return RANDOM_INTERPOLATION[int(rng.integers(0, 2))]
  return INTERPOLATIONS[name]


def random_resized_crop(rng, img: Image.Image, size: int, scale, ratio, interpolation: str):
  """[H, W] image -> [size, size]: crop then resize, as torchvision's F.resized_crop on PIL."""
  top, left, h, w = rrc_params(rng, img.width, img.height, scale, ratio)
  resample = pick_interpolation(rng, interpolation)
  return img.crop((left, top, left + w, top + h)).resize((size, size), resample)


def resize_shorter(img: Image.Image, size: int, resample) -> Image.Image:
  """Shorter side to `size`, aspect kept, longer side truncated (torchvision Resize(int))."""
  w, h = img.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """Center crop with torchvision's rounding (round half to even of the offset)."""
  w, h = img.size
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def normalize(img: Image.Image, mean, std) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 (x / 255 - mean) / std, [H, W, 3]."""
  x = np.asarray(img).astype(np.float32)  # (asarray(img, float32) is 3x slower)
  x *= np.float32(1.0 / 255.0) / np.asarray(std, np.float32)
  x -= np.asarray(mean, np.float32) / np.asarray(std, np.float32)
  return x


def erase_box(rng, height: int, width: int, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
  """One random erasing box (top, left, h, w) or None: timm RandomErasing._erase, count 1."""
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  area = height * width
  for _ in range(10):
    target_area = rng.uniform(min_area, max_area) * area
    aspect_ratio = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(target_area * aspect_ratio)))
    w = int(round(math.sqrt(target_area / aspect_ratio)))
    if w < width and h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return None


def random_erasing(rng, x: np.ndarray, prob: float, mode: str) -> np.ndarray:
  """Random erasing on a normalized [H, W, C] float image, in place (timm RandomErasing).

  mode 'pixel': per-pixel N(0, 1); 'rand': per-channel N(0, 1); 'const': zeros.
  The recipe applies it after normalization (reference section 8).
  """
  if rng.random() > prob:
    return x
  box = erase_box(rng, x.shape[0], x.shape[1])
  if box is None:
    return x
  top, left, h, w = box
  if mode == "pixel":
    fill = rng.standard_normal((h, w, x.shape[2]), dtype=np.float32)
  elif mode == "rand":
    fill = rng.standard_normal((1, 1, x.shape[2]), dtype=np.float32)
  else:
    fill = np.float32(0.0)
  x[top : top + h, left : left + w] = fill
  return x


def train_transform(rng, img: Image.Image, cfg, ra_spec, ra_hparams) -> np.ndarray:
  """The official train transform (reference section 8) -> float32 [S, S, 3].

  random resized crop -> horizontal flip -> RandAugment -> normalize -> random erasing.
  `cfg` is a validated data config (fec_jax.data.config); `ra_spec`/`ra_hparams` come from
  `randaugment_setup(cfg)` (None: RandAugment off).
  """
  img = random_resized_crop(
      rng, img, cfg.image_size, tuple(cfg.scale), tuple(cfg.ratio), cfg.interpolation
  )
  if cfg.hflip > 0 and rng.random() < cfg.hflip:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if ra_spec is not None:
    img = randaugment.rand_augment(rng, img, ra_spec, ra_hparams)
  x = normalize(img, cfg.mean, cfg.std)
  if cfg.reprob > 0:
    x = random_erasing(rng, x, cfg.reprob, cfg.remode)
  return x


def randaugment_setup(cfg):
  """(RandAugmentSpec, hparams) for cfg.rand_augment, or (None, None) when it is ''."""
  if not cfg.rand_augment:
    return None, None
  resample = None if cfg.interpolation == "random" else INTERPOLATIONS[cfg.interpolation]
  return randaugment.parse(cfg.rand_augment), randaugment.hparams_for(cfg.mean, resample)


def eval_transform(img: Image.Image, cfg) -> np.ndarray:
  """Eval transform: shorter side to floor(size / crop_pct), center crop -> float32 [S, S, 3]."""
  scale_size = math.floor(cfg.image_size / cfg.crop_pct)
  img = resize_shorter(img, scale_size, INTERPOLATIONS[cfg.eval_interpolation])
  return normalize(center_crop(img, cfg.image_size), cfg.mean, cfg.std)
