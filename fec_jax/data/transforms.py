"""Host-side image ops of the official recipe (docs/official-code.md Sec. 8), numpy/PIL.

Every op that draws random numbers takes an `rng` with the methods of
`np.random.Generator` (`random`, `uniform`, `integers`, `normal`) and draws them in
the same order as timm's code draws from Python's `random`, so that tests can
replay one stream of uniforms through both implementations.

The host does what needs the decoded image: decode, crop and resize, flip, RandAugment.
It hands out uint8 [S, S, 3] images and, for training, the random erasing box; the float
ops (normalization, the erasing fill) run on device (fec_jax.data.device_transforms),
which moves 4x fewer bytes between worker processes and to the device.
"""

import io
import math

import numpy as np
from PIL import Image, ImageOps
import simplejpeg

from fec_jax.data import randaugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
EXIF_ORIENTATION = 0x0112  # the EXIF tag upright() reads
NO_ERASE = np.zeros(4, np.int32)  # an erasing box (top, left, h, w) of zero size

# JPEG colour spaces that simplejpeg decodes to RGB exactly as PIL's open + convert("RGB").
_FAST_JPEG_SPACES = {"YCbCr": False, "Gray": True}  # -> converted


class BadImageError(ValueError):
  """The bytes of a record are not a decodable image."""


def _decode_jpeg(encoded: bytes):
  """(uint8 [H, W, 3], converted) with simplejpeg, or None where PIL must decode.

  simplejpeg and Pillow wheels both decode with libjpeg-turbo (islow DCT, fancy
  upsampling), so the pixels are the same (tests/test_data_pipeline.py checks this)
  and simplejpeg is about 40% faster, most of all by skipping PIL's RGB -> RGBX
  unpacking. CMYK/YCCK files and anything libjpeg only warns about (which simplejpeg's
  strict mode raises on and PIL tolerates) go to PIL, whose result timm would see.
  """
  try:
    colorspace = simplejpeg.decode_jpeg_header(encoded)[2]
    if colorspace not in _FAST_JPEG_SPACES:
      return None
    return simplejpeg.decode_jpeg(encoded, colorspace="RGB"), _FAST_JPEG_SPACES[colorspace]
  except ValueError:
    return None


def open_image(encoded: bytes | OSError) -> Image.Image:
  """The loaded PIL image of an encoded file; BadImageError for a file that could not be read
  (the OSError a source met reading it) and for empty, unknown, truncated or corrupt data."""
  if isinstance(encoded, OSError):
    raise BadImageError(f"cannot be read ({encoded.strerror or encoded})")
  if not encoded:
    raise BadImageError("empty file")
  try:
    img = Image.open(io.BytesIO(encoded))
    img.load()
  except Image.UnidentifiedImageError as e:  # its text names a BytesIO object's address
    raise BadImageError("not an image file PIL can read") from e
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
    raise BadImageError(f"{type(e).__name__}: {e}") from e
  return img


def _decode_pil(encoded: bytes) -> tuple[np.ndarray, bool]:
  img = open_image(encoded)
  if img.mode == "RGB":
    return np.asarray(img), False
  if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    arr = np.asarray(img, dtype=np.float64)
    # 16 bits: 'I;16*', and 'I' from a PNG or PGM/PPM (Pillow scales a PGM's maxval to 65535),
    # whatever the values (a dark image too); another 'I' or 'F' (TIFF) by its values' range
    sixteen = img.mode.startswith("I;16") or (img.mode == "I" and img.format in ("PNG", "PPM"))
    scale = 257.0 if sixteen or arr.max() > 255 else 1.0
    img = Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8))
  return np.asarray(img.convert("RGB")), True


def decode(encoded) -> tuple[np.ndarray, bool]:
  """Decodes an encoded image (bytes) or a uint8 HW/HWC array to uint8 RGB [H, W, 3].

  Returns (image, converted) where `converted` says the input was not 8-bit RGB
  (grayscale, palette, CMYK, RGBA, 16-bit, ...). Raises BadImageError for an unreadable file
  (an OSError in place of the bytes) and for empty, truncated or corrupt data. 16-bit images
  are scaled to 8 bits (PIL's own convert('RGB') would clip them to white); other modes use
  PIL's convert('RGB'), as torchvision's ImageFolder loader does (alpha is dropped, CMYK
  converted naively).
  """
  if isinstance(encoded, np.ndarray):
    return np.asarray(Image.fromarray(encoded).convert("RGB")), encoded.ndim != 3
  if isinstance(encoded, bytes) and encoded[:2] == b"\xff\xd8":  # JPEG start-of-image marker
    fast = _decode_jpeg(encoded)
    if fast is not None:
      return fast
  return _decode_pil(encoded)


def upright(image: np.ndarray, encoded: bytes) -> np.ndarray:
  """uint8 [H, W, 3] decoded from `encoded`, turned by the file's EXIF orientation (phone photos)
  as OpenCV's imread and imdecode turn a colour image (the same pixels, all 8 orientations, JPEG,
  PNG and TIFF), with Pillow's exif_transpose; `image` itself where the file has no orientation to
  apply, or is a TIFF, which Pillow's load (decode) turns already (a PNG's orientation is read
  from its eXIf chunk, as OpenCV reads it, not from ImageMagick's text chunk). mmseg's images and
  the official visualization script are read so; classification data is read as stored, as
  timm's loader does."""
  with Image.open(io.BytesIO(encoded)) as img:
    if img.format == "TIFF":  # its getexif still has the orientation that the load applied
      return image
    if img.format == "PNG" and b"eXIf" not in encoded:  # cv2 reads a PNG's EXIF there only;
      return image  # Pillow's getexif would decode it all again for its text chunks
    exif = img.getexif()
  if exif.get(EXIF_ORIENTATION, 1) == 1:
    return image
  turned = Image.fromarray(image)
  turned.info["exif"] = exif.tobytes()  # what exif_transpose reads the orientation from
  return np.asarray(ImageOps.exif_transpose(turned))


def rrc_params(rng, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
  """Random resized crop box (top, left, h, w): timm
  RandomResizedCropAndInterpolation.get_params."""
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
    return randaugment.RANDOM_INTERPOLATION[int(rng.integers(0, 2))]
  return INTERPOLATIONS[name]


def random_resized_crop(rng, image: np.ndarray, size: int, scale, ratio, interpolation: str):
  """uint8 [H, W, 3] -> PIL [size, size]: crop then resize, as torchvision's F.resized_crop
  on PIL (cropping the array first only copies the crop into PIL)."""
  top, left, h, w = rrc_params(rng, image.shape[1], image.shape[0], scale, ratio)
  resample = pick_interpolation(rng, interpolation)
  crop = Image.fromarray(np.ascontiguousarray(image[top : top + h, left : left + w]))
  return crop.resize((size, size), resample)


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


def erase_params(rng, height: int, width: int, prob: float) -> np.ndarray:
  """timm RandomErasing's draws for one image: int32 [4] box (top, left, h, w), NO_ERASE when
  the gate or all ten tries fail. The fill is drawn on device (device_transforms.erase)."""
  if rng.random() > prob:
    return NO_ERASE
  box = erase_box(rng, height, width)
  return NO_ERASE if box is None else np.asarray(box, np.int32)


def train_transform(rng, image: np.ndarray, cfg, ra_spec, ra_hparams):
  """The host part of the official train transform (docs/official-code.md Sec. 8).

  uint8 [H, W, 3] -> (uint8 [S, S, 3], erase box int32 [4]): random resized crop ->
  horizontal flip -> RandAugment; Mixup/CutMix, normalization and the erasing fill follow on
  device (fec_jax.tasks.classification.per_device_augment), in the official training's order.
  `cfg` is a validated data config; `ra_spec`/`ra_hparams` come from `randaugment_setup(cfg)`
  (None: RandAugment off).
  """
  img = random_resized_crop(
      rng, image, cfg.image_size, tuple(cfg.scale), tuple(cfg.ratio), cfg.interpolation
  )
  if cfg.hflip > 0 and rng.random() < cfg.hflip:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if ra_spec is not None:
    img = randaugment.rand_augment(rng, img, ra_spec, ra_hparams)
  box = erase_params(rng, img.height, img.width, cfg.reprob) if cfg.reprob > 0 else NO_ERASE
  return np.asarray(img), box


def randaugment_setup(cfg):
  """(RandAugmentSpec, hparams) for cfg.rand_augment, or (None, None) when it is ''."""
  if not cfg.rand_augment:
    return None, None
  resample = None if cfg.interpolation == "random" else INTERPOLATIONS[cfg.interpolation]
  return randaugment.parse(cfg.rand_augment), randaugment.hparams_for(cfg.mean, resample)


def eval_transform(image: np.ndarray, cfg) -> np.ndarray:
  """Eval transform, uint8 [H, W, 3] -> uint8 [S, S, 3]: shorter side to
  floor(size / crop_pct), center crop (normalization follows on device)."""
  scale_size = math.floor(cfg.image_size / cfg.crop_pct)
  img = resize_shorter(Image.fromarray(image), scale_size, INTERPOLATIONS[cfg.eval_interpolation])
  return np.asarray(center_crop(img, cfg.image_size))
