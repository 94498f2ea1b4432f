"""The data config (`config.data`): every field, its meaning and the official defaults.

Defaults are the official ImageNet-1k recipe (docs/official-code.md Sec. 8). Functions of this
package call `validate(cfg)`, which rejects unknown fields (typos) and bad values.
"""

import ml_collections

from fec_jax.data import randaugment, transforms

SOURCES = ("folder", "tfds", "demo")
ERASE_MODES = ("pixel", "rand", "const")
TRAIN_INTERPOLATIONS = ("random", "bilinear", "bicubic", "nearest", "lanczos")


def default_config() -> ml_collections.ConfigDict:
  """Official-recipe data config. Fields:

  source: 'folder' (root/train/<class>/*, root/val/<class>/*; ImageNet or any other
      folder dataset, classes sorted by folder name), 'tfds' (tfds.data_source of
      `tfds_name`, array_record), or 'demo' (scikit-learn digits, bundled).
  root: folder source directory (holds train/ and val/).
  tfds_name, tfds_data_dir: TFDS builder name and data_dir ('' = TFDS default); a
      tfds_data_dir needs source 'tfds'.
  train_split, val_split: split names; '' = 'train' / 'val' for folders,
      'train' / 'validation' for TFDS, 'train' / 'val' for the demo.
  num_classes: number of classes; the folder source checks it against the folders, the
      TFDS source against its 'label' ClassLabel.
  image_size: train crop / eval crop side (224).
  crop_pct: eval resizes the shorter side to floor(image_size / crop_pct) (0.9 -> 248).
  eval_interpolation: eval resize filter ('bicubic').
  scale, ratio: random resized crop area fraction and aspect ratio ranges.
  interpolation: train resize filter; 'random' = bilinear or bicubic per image (and per
      RandAugment geometric op), as timm does.
  hflip: horizontal flip probability.
  rand_augment: timm RandAugment string; '' disables RandAugment.
  reprob, remode: random erasing probability and mode ('pixel', 'rand', 'const'),
      applied after normalization; reprob 0 disables it.
  mean, std: normalization (ImageNet statistics, RGB, 0-1 scale).
  mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob, label_smoothing: on-device
      Mixup/CutMix (fec_jax.data.mixup.mixup_cutmix), timm semantics, drawn per device shard
      as the official per-GPU pipeline does (docs/official-code.md Sec. 8).
  demo_image_size: side of the upscaled demo digits (the demo's image_size follows it).
  demo_val_fraction: held-out fraction of the demo data (stratified, fixed seed).
  num_workers: loader worker processes per host; 0 = in the calling process,
      -1 = one per CPU this process may run on.
  prefetch_buffer_size: batches buffered per worker process.
  read_threads: threads per worker process, each making one batch at a time (reading,
      decoding and transforming its images): a worker holds up to read_threads +
      prefetch_buffer_size batches.
  """
  c = ml_collections.ConfigDict()
  c.source = "folder"
  c.root = ""
  c.tfds_name = "imagenet2012"
  c.tfds_data_dir = ""
  c.train_split = ""
  c.val_split = ""
  c.num_classes = 1000
  c.image_size = 224
  c.crop_pct = 0.9
  c.eval_interpolation = "bicubic"
  c.scale = (0.08, 1.0)
  c.ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.interpolation = "random"
  c.hflip = 0.5
  c.rand_augment = "rand-m9-mstd0.5-inc1"
  c.reprob = 0.25
  c.remode = "pixel"
  c.mean = transforms.IMAGENET_MEAN
  c.std = transforms.IMAGENET_STD
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0
  c.mixup_prob = 1.0
  c.mixup_switch_prob = 0.5
  c.label_smoothing = 0.1
  c.demo_image_size = 32
  c.demo_val_fraction = 0.2
  c.num_workers = -1
  c.prefetch_buffer_size = 2
  c.read_threads = 2
  return c.lock()  # locked like the configs/ files that replace theirs with it: typos fail


def demo_config() -> ml_collections.ConfigDict:
  """Config for the bundled digits demo: 32x32, light augmentation, no mixing. image_size
  follows demo_image_size (--config.data.demo_image_size=64 trains on 64x64 digits), unless
  given itself."""
  c = default_config()
  c.source = "demo"
  c.num_classes = 10
  c.image_size = c.get_ref("demo_image_size") + 0  # a reference of its own: setting it unlinks
  c.crop_pct = 1.0
  c.scale = (0.6, 1.0)
  c.ratio = (0.8, 1.25)
  c.interpolation = "bilinear"
  c.hflip = 0.0
  c.rand_augment = ""
  c.reprob = 0.0
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.label_smoothing = 0.0
  c.num_workers = 0
  return c


def is_range(value) -> bool:
  """A (low, high) range with 0 < low <= high."""
  return len(value) == 2 and 0 < value[0] <= value[1]


def loader_checks(cfg) -> list[tuple[bool, str]]:
  """validate's checks of the loader's fields, shared with the segmentation data."""
  return [
      (
          cfg.num_workers >= -1,
          f"num_workers must be >= -1 (-1: one per CPU, 0: none), got {cfg.num_workers}",
      ),
      *(
          (cfg[f] >= 1, f"{f} must be >= 1, got {cfg[f]}")
          for f in ("prefetch_buffer_size", "read_threads")
      ),
  ]


def normalization_checks(cfg) -> list[tuple[bool, str]]:
  """validate's checks of the normalization (mean, std), shared with the segmentation data."""
  return [
      (
          len(cfg.mean) == 3 and len(cfg.std) == 3,
          f"mean and std need 3 values, got {cfg.mean} and {cfg.std}",
      ),
      (len(cfg.std) == 3 and min(cfg.std) > 0, "std must be > 0 (the images are divided by it)"),
      (
          all(0 <= m <= 1 for m in cfg.mean) and all(s <= 1 for s in cfg.std),
          f"mean {tuple(cfg.mean)} and std {tuple(cfg.std)} must be on the 0-1 scale: images are "
          "normalized as (x / 255 - mean) / std, as torchvision's Normalize; values on the 0-255 "
          "scale (mmseg's img_norm_cfg) divided by 255 give them, e.g. ImageNet's "
          "--config.data.mean=0.485,0.456,0.406 --config.data.std=0.229,0.224,0.225",
      ),
  ]


def check_fields(cfg, defaults) -> None:
  """ValueError for a field of `cfg` that `defaults()`, the config function it starts from, does
  not define (a typo) or for one it lacks, or whose numbers hold another value (the override
  `--config.data.mean=(0.5,x,3)` is the tuple ('(0.5,x,3)',), on which validate's comparisons
  failed with a TypeError); shared with the segmentation data."""
  template = defaults()
  known = set(template.keys())
  unknown = sorted(set(cfg.keys()) - known)
  if unknown:
    raise ValueError(f"unknown config.data fields {unknown}; known: {sorted(known)}")
  missing = sorted(known - set(cfg.keys()))
  if missing:
    raise ValueError(f"config.data lacks fields {missing}; start from {defaults.__name__}()")
  numbers = lambda value: all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
  )
  for name, like in template.items():  # before the checks compare them: ('(0.5,x,3)',)
    if isinstance(like, tuple) and like and numbers(like) and not numbers(cfg[name]):
      raise ValueError(
          f"config.data: {name} must hold numbers, got {tuple(cfg[name])}; e.g. "
          f"--config.data.{name}={','.join(map(str, like))}"
      )


def check_all(checks: list[tuple[bool, str]]) -> None:
  """ValueError "config.data: <message>" for the first (ok, message) of `checks` that is not ok;
  shared with the segmentation data."""
  for ok, msg in checks:
    if not ok:
      raise ValueError(f"config.data: {msg}")


def validate(cfg) -> None:
  """Raises ValueError for fields default_config() does not define or out-of-range values."""
  check_fields(cfg, default_config)
  checks = [
      (cfg.source in SOURCES, f"source must be one of {SOURCES}"),
      (
          cfg.source == "folder" or not cfg.root,
          f"root {cfg.root!r} is read by source 'folder' only, and source is {cfg.source!r}: "
          "give --config.data.source=folder to read that folder, or --config.data.root=''",
      ),
      (
          cfg.source == "tfds" or not cfg.tfds_data_dir,
          f"tfds_data_dir {cfg.tfds_data_dir!r} is read by source 'tfds' only, and source is "
          f"{cfg.source!r}: give --config.data.source=tfds to read TFDS {cfg.tfds_name} there, "
          "or --config.data.tfds_data_dir=''",
      ),
      (cfg.remode in ERASE_MODES, f"remode must be one of {ERASE_MODES}"),
      (
          cfg.interpolation in TRAIN_INTERPOLATIONS,
          f"interpolation must be one of {TRAIN_INTERPOLATIONS}",
      ),
      (
          cfg.eval_interpolation in TRAIN_INTERPOLATIONS[1:],
          f"eval_interpolation must be one of {TRAIN_INTERPOLATIONS[1:]}",
      ),
      *((cfg[f] > 0, f"{f} must be > 0, got {cfg[f]}") for f in ("num_classes", "image_size")),
      (0 < cfg.crop_pct <= 1, f"crop_pct must be in (0, 1], got {cfg.crop_pct}"),
      *(
          (0 <= cfg[f] <= 1, f"{f} must be in [0, 1], got {cfg[f]}")
          for f in ("hflip", "reprob", "mixup_prob", "mixup_switch_prob")
      ),
      (
          0 <= cfg.label_smoothing < 1,
          f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}",
      ),
      (
          0 < cfg.demo_val_fraction < 1,
          f"demo_val_fraction must be in (0, 1), got {cfg.demo_val_fraction}",
      ),
      (
          is_range(cfg.scale),
          f"scale must be (low, high) with 0 < low <= high, got {cfg.scale}",
      ),
      (
          is_range(cfg.ratio),
          f"ratio must be (low, high) with 0 < low <= high, got {cfg.ratio}",
      ),
      *normalization_checks(cfg),
      *((cfg[f] >= 0, f"{f} must be >= 0, got {cfg[f]}") for f in ("mixup_alpha", "cutmix_alpha")),
      *loader_checks(cfg),
  ]
  check_all(checks)
  if cfg.rand_augment:
    randaugment.parse(cfg.rand_augment)
