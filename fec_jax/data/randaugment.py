"""RandAugment as timm implements it, on PIL images (docs/official-code.md Sec. 8:
"rand-m9-mstd0.5-inc1").

Written to reproduce timm's `auto_augment.rand_augment_transform` number for number
rather than using a generic RandAugment, because the recipe depends on timm's
particulars: the 15-op "increasing" set, magnitude noise clipped to [0, 10], each op
applied with probability 0.5, random sign of signed ops, bilinear/bicubic at random for
geometric ops, fill colour = the mean in 0-255, translation as a fraction (0.45) of size.

Random draws (in timm's order, see transforms.py): ops = integers(0, 15, size=n);
per op: random() for the 0.5 gate, normal(m, mstd) for the magnitude, random() for
the sign of signed ops, integers(0, 2) for the resample filter of geometric ops.
"""

import re
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageOps

_LEVEL_DENOM = 10.0
RANDOM_INTERPOLATION = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)  # timm's choice

# timm's _RAND_INCREASING_TRANSFORMS (inc1) and _RAND_TRANSFORMS (inc0), in timm's order.
INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
DEFAULT_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
_SIGNED = {
    "Rotate",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
}
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


@dataclass(frozen=True)
class RandAugmentSpec:
  """Parsed timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'."""

  magnitude: float = 10.0
  num_layers: int = 2
  prob: float = 0.5
  magnitude_std: float = 0.0
  magnitude_max: float = _LEVEL_DENOM
  ops: tuple = DEFAULT_OPS


def parse(config_str: str) -> RandAugmentSpec:
  """timm's config string grammar: rand[-mM][-nN][-pP][-mstdS][-mmaxX][-incI]; fails on others."""
  parts = config_str.split("-")
  if parts[0] != "rand":
    raise ValueError(f'only RandAugment ("rand-...") is supported, got {config_str!r}')
  kw, increasing = {}, False
  numbers = {"mstd": float, "mmax": int, "inc": int, "m": int, "n": int, "p": float}
  for part in parts[1:]:
    key, text = (re.split(r"(\d.*)", part) + [""])[:2]
    if key not in numbers:
      raise ValueError(f"unknown RandAugment section {part!r} in {config_str!r}")
    try:
      value = numbers[key](text)
    except ValueError:
      kind = "a number" if numbers[key] is float else "an integer"
      raise ValueError(
          f"RandAugment section {part!r} of {config_str!r} needs {key} followed by {kind}, e.g. "
          "rand-m9-mstd0.5-inc1"
      ) from None
    if key == "mstd":
      kw["magnitude_std"] = float("inf") if value > 100 else value
    elif key == "mmax":
      kw["magnitude_max"] = float(value)
    elif key == "inc":
      increasing = bool(value)
    elif key == "m":
      kw["magnitude"] = float(value)
    elif key == "n":
      kw["num_layers"] = value
    else:  # "p"
      kw["prob"] = value
  return RandAugmentSpec(ops=INCREASING_OPS if increasing else DEFAULT_OPS, **kw)


def hparams_for(mean, resample=None) -> dict:
  """timm transforms_imagenet_train's aa_params: fill = round(255 * mean); `resample` is a
  fixed PIL filter, or None for train interpolation 'random' (each geometric op draws one)."""
  hp = {"fill": tuple(min(255, round(255 * m)) for m in mean)}
  if resample is not None:
    hp["resample"] = resample
  return hp


def level_to_arg(name: str, level: float, negate: bool):
  """timm's LEVEL_TO_ARG: magnitude level (0..10) -> op argument; `negate` is the random sign."""
  sign = -1.0 if negate else 1.0
  if name == "Rotate":
    return sign * level / _LEVEL_DENOM * 30.0
  if name in ("ShearX", "ShearY"):
    return sign * level / _LEVEL_DENOM * 0.3
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * level / _LEVEL_DENOM * 0.45
  if name == "Posterize":
    return int(level / _LEVEL_DENOM * 4)
  if name == "PosterizeIncreasing":
    return 4 - int(level / _LEVEL_DENOM * 4)
  if name == "Solarize":
    return min(256, int(level / _LEVEL_DENOM * 256))
  if name == "SolarizeIncreasing":
    return 256 - min(256, int(level / _LEVEL_DENOM * 256))
  if name == "SolarizeAdd":
    return min(128, int(level / _LEVEL_DENOM * 110))
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return level / _LEVEL_DENOM * 1.8 + 0.1
  if name in (
      "ColorIncreasing",
      "ContrastIncreasing",
      "BrightnessIncreasing",
      "SharpnessIncreasing",
  ):
    return max(0.1, 1.0 + sign * level / _LEVEL_DENOM * 0.9)
  return None


def _affine(img, matrix, resample, fill):
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _posterize(img, bits):
  """ImageOps.posterize as Pillow < 13 computed it, bits 0 included (all black); Pillow 13
  rejects bits=0, which 'PosterizeIncreasing' at magnitude >= 10 asks for."""
  if bits >= 8:
    return img
  mask = ~(2 ** (8 - bits) - 1) & 0xFF
  return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _solarize_add(img, add, thresh=128):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def apply_op(img: Image.Image, name: str, arg, resample, fill) -> Image.Image:
  """One RandAugment op with its argument fixed (timm's NAME_TO_OP), RGB in and out."""
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Invert":
    return ImageOps.invert(img)
  if name == "Rotate":
    return img.rotate(arg, resample=resample, fillcolor=fill)
  if name in ("Posterize", "PosterizeIncreasing"):
    return _posterize(img, arg)
  if name in ("Solarize", "SolarizeIncreasing"):
    return ImageOps.solarize(img, arg)
  if name == "SolarizeAdd":
    return _solarize_add(img, arg)
  if name.startswith("Color"):
    return ImageEnhance.Color(img).enhance(arg)
  if name.startswith("Contrast"):
    return ImageEnhance.Contrast(img).enhance(arg)
  if name.startswith("Brightness"):
    return ImageEnhance.Brightness(img).enhance(arg)
  if name.startswith("Sharpness"):
    return ImageEnhance.Sharpness(img).enhance(arg)
  if name == "ShearX":
    return _affine(img, (1, arg, 0, 0, 1, 0), resample, fill)
  if name == "ShearY":
    return _affine(img, (1, 0, 0, arg, 1, 0), resample, fill)
  if name == "TranslateXRel":
    return _affine(img, (1, 0, arg * img.size[0], 0, 1, 0), resample, fill)
  if name == "TranslateYRel":
    return _affine(img, (1, 0, 0, 0, 1, arg * img.size[1]), resample, fill)
  raise ValueError(f"unknown RandAugment op {name!r}")


def sample_magnitude(rng, spec: RandAugmentSpec) -> float:
  """timm AugmentOp: gauss(m, mstd) (uniform(0, m) for mstd=inf), clipped to [0, mmax]."""
  m = spec.magnitude
  if spec.magnitude_std == float("inf"):
    m = rng.uniform(0.0, m)
  elif spec.magnitude_std > 0:
    m = rng.normal(m, spec.magnitude_std)
  return max(0.0, min(m, spec.magnitude_max))


def augment_op(rng, img: Image.Image, name: str, spec: RandAugmentSpec, hparams: dict):
  """One timm AugmentOp call: gate with spec.prob, noisy magnitude, sign, resample."""
  if spec.prob < 1.0 and rng.random() > spec.prob:
    return img
  level = sample_magnitude(rng, spec)
  negate = name in _SIGNED and rng.random() > 0.5
  arg = level_to_arg(name, level, negate)
  resample = hparams.get("resample")
  if name in _GEOMETRIC and resample is None:
    resample = RANDOM_INTERPOLATION[int(rng.integers(0, 2))]
  return apply_op(img, name, arg, resample, hparams["fill"])


def rand_augment(rng, img: Image.Image, spec: RandAugmentSpec, hparams: dict) -> Image.Image:
  """timm RandAugment.__call__: spec.num_layers ops drawn uniformly with replacement."""
  for k in rng.integers(0, len(spec.ops), size=spec.num_layers):
    img = augment_op(rng, img, spec.ops[int(k)], spec, hparams)
  return img
