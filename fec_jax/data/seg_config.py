"""The segmentation data config (`config.data` of a segmentation task): fields and defaults.

Defaults are the authors' ADE20K recipe: segmentation/configs/sem_fpn/fpn_fec_small_ade20k_80k.py
of their repository, on mmsegmentation 0.24. Functions of the segmentation pipeline call
`validate(cfg)`, which rejects unknown fields (typos) and bad values.
"""

import ml_collections
from ml_collections.config_dict import config_dict

from fec_jax.data import transforms
from fec_jax.data.config import (
    check_all,
    check_fields,
    is_range,
    loader_checks,
    normalization_checks,
)

SEG_SOURCES = ("ade20k", "demo")
DEMO_CLASS_NAMES = ("background", "disc", "square", "triangle", "cross")  # demo labels 0..4
DEMO_NUM_CLASSES = len(DEMO_CLASS_NAMES)


def ade20k_config() -> ml_collections.ConfigDict:
  """The official ADE20K data config. Fields:

  source: 'ade20k' (the ADEChallengeData2016 folder: <root>/images/<split>/*.jpg and
      <root>/annotations/<split>/*.png, one annotation per image, same file stem) or 'demo'
      (synthetic shapes generated on the fly, see seg_sources.demo_example).
  root: the ADEChallengeData2016 folder (ade20k source).
  train_split, val_split: sub-folder names of images/ and annotations/ ('training',
      'validation'); the demo's splits are always its own train and val sets.
  num_classes: classes after reduce_zero_label (150 for ADE20K).
  class_names: the classes' names in label order, for eval.py's per-class table and
      visualize_seg.py's legend; () = ADE20K's 150 (source ade20k with 150 classes), the demo's
      5, or 'class 0', 'class 1', ... (fec_jax.data.classes.segmentation_names).
  reduce_zero_label: annotation 0 ('other') -> 255, 1..K -> 0..K-1 (mmseg's
      LoadAnnotations(reduce_zero_label=True), which writes 255 whatever the ignore index:
      needs ignore_index 255).
  ignore_index: label value the loss and the metric ignore; also the label padding (255).
  img_scale: (long, short) edge bounds of the keep-ratio resize, mmseg's img_scale
      (2048, 512): scale factor min(long / max(h, w), short / min(h, w)).
  ratio_range: train multiplies img_scale by a ratio drawn uniformly from this range
      (mmseg Resize(ratio_range=(0.5, 2.0))).
  crop_size: train random crop (height, width), then padding to it (512, 512).
  cat_max_ratio: the crop is redrawn (up to 10 times) while one class covers at least this
      fraction of its non-ignored pixels (0.75); 1.0 disables the check.
  flip_prob: horizontal flip probability (0.5).
  photometric: apply mmseg's PhotoMetricDistortion (train).
  brightness_delta, contrast_range, saturation_range, hue_delta: its ranges (32,
      (0.5, 1.5), (0.5, 1.5), 18).
  size_divisor: test images are resized (after the keep-ratio resize) to sides that are
      multiples of this (the authors' AlignResize, 32).
  mean, std: normalization (ImageNet statistics, RGB, 0-1 scale), applied on device
      (seg_device_transforms.normalize), where the padding becomes 0 as in mmseg.
  demo_image_size, demo_num_train, demo_num_val, demo_seed: the synthetic demo's image side,
      split sizes and seed.
  num_workers: loader worker processes per host; 0 = in the calling process,
      -1 = one per CPU this process may run on.
  prefetch_buffer_size: batches buffered per worker process.
  read_threads: threads per worker process, each making one batch at a time (reading,
      decoding and transforming its images): a worker holds up to read_threads +
      prefetch_buffer_size batches.
  """
  c = ml_collections.ConfigDict()
  c.source = "ade20k"
  c.root = ""
  c.train_split = "training"
  c.val_split = "validation"
  c.num_classes = 150
  c.class_names = ()
  c.reduce_zero_label = True
  c.ignore_index = 255
  c.img_scale = (2048, 512)
  c.ratio_range = (0.5, 2.0)
  c.crop_size = (512, 512)
  c.cat_max_ratio = 0.75
  c.flip_prob = 0.5
  c.photometric = True
  c.brightness_delta = 32
  c.contrast_range = (0.5, 1.5)
  c.saturation_range = (0.5, 1.5)
  c.hue_delta = 18
  c.size_divisor = 32
  c.mean = transforms.IMAGENET_MEAN
  c.std = transforms.IMAGENET_STD
  c.demo_image_size = 64
  c.demo_num_train = 2000
  c.demo_num_val = 200
  c.demo_seed = 0
  c.num_workers = -1
  c.prefetch_buffer_size = 2
  c.read_threads = 2
  return c.lock()  # locked like the configs/ files that replace theirs with it: typos fail


class _Scalable(tuple):
  """A tuple whose product with a number multiplies each element: _Scalable((1, 1)) * 96 is
  (96, 96), a plain tuple. The operand of demo_config's img_scale and crop_size (a module class,
  so that the config pickles)."""

  def __mul__(self, factor):
    return tuple(v * factor for v in self)


def demo_config() -> ml_collections.ConfigDict:
  """The synthetic shapes demo (5 classes, 64x64): the official train pipeline at the demo's
  scale (keep-ratio resize to 64 with a ratio in 0.75-1.5, 64x64 crop, flip, photometric).
  The milder ratio range keeps the smallest shapes about 10 pixels wide (6 at ratio 0.5); a
  tiny conv segmenter reached 53 mIoU after 480 steps with it, 47 with the official 0.5-2.0
  (one run each).

  img_scale and crop_size are (demo_image_size, demo_image_size) and follow it: an override
  of demo_image_size (--config.data.demo_image_size=96) resizes and crops at 96 too, unless
  img_scale or crop_size is given itself (which then stays as given)."""
  c = ade20k_config()
  c.source = "demo"
  c.num_classes = DEMO_NUM_CLASSES
  c.reduce_zero_label = False
  side = c.get_ref("demo_image_size")
  for field in ("img_scale", "crop_size"):  # references, read as tuples; setting one ends its link
    c[field] = config_dict.FieldReference(_Scalable((1, 1)), tuple) * side
  c.ratio_range = (0.75, 1.5)
  c.num_workers = 0
  return c


def validate(cfg) -> None:
  """Raises ValueError for fields ade20k_config() does not define or out-of-range values."""
  check_fields(cfg, ade20k_config)
  names = tuple(cfg.class_names)
  checks = [
      (cfg.source in SEG_SOURCES, f"source must be one of {SEG_SOURCES}"),
      (
          cfg.source == "ade20k" or not cfg.root,
          f"root {cfg.root!r} is read by source 'ade20k' only, and source is {cfg.source!r}: "
          "give --config.data.source=ade20k to read that folder, or --config.data.root=''",
      ),
      (0 < cfg.num_classes < 255, "num_classes must be in [1, 254] (labels are uint8)"),
      (
          not names or (len(names) == cfg.num_classes and all(isinstance(n, str) for n in names)),
          f"class_names holds {len(names)} name{'' if len(names) == 1 else 's'} {names[:3]}"
          f"{' ...' if len(names) > 3 else ''} for {cfg.num_classes} classes; give one string "
          "per class in label order, e.g. --config.data.class_names=\"('road', 'sky', 'car')\", "
          "or () for the defaults",
      ),
      (0 <= cfg.ignore_index <= 255, "ignore_index must be in [0, 255]"),
      (
          cfg.ignore_index >= cfg.num_classes,
          f"ignore_index {cfg.ignore_index} must not be a class (>= num_classes "
          f"{cfg.num_classes})"
          + (
              "; to leave out id 0 (background, 'other'), give --config.data.reduce_zero_label"
              "=True with ignore_index 255: ids 1..K are then the classes 0..K-1 (num_classes K), "
              "as ADE20K's"
              if cfg.ignore_index == 0 and not cfg.reduce_zero_label
              else ""
          ),
      ),
      (
          cfg.ignore_index == 255 or not cfg.reduce_zero_label,
          f"reduce_zero_label turns annotation 0 into 255, so it needs ignore_index 255 (got "
          f"{cfg.ignore_index}); or give --config.data.reduce_zero_label=False",
      ),
      (
          len(cfg.img_scale) == 2 and min(cfg.img_scale) > 0,
          f"img_scale needs 2 positive sides (--config.data.img_scale=2048,512), got "
          f"{cfg.img_scale}",
      ),
      (
          is_range(cfg.ratio_range),
          f"ratio_range must be (low, high) with 0 < low <= high, got {cfg.ratio_range}",
      ),
      (
          len(cfg.crop_size) == 2 and min(cfg.crop_size) > 0,
          f"crop_size needs 2 positive sides, H and W (--config.data.crop_size=512,512), got "
          f"{cfg.crop_size}",
      ),
      (0 < cfg.cat_max_ratio <= 1, "cat_max_ratio must be in (0, 1]"),
      (0 <= cfg.flip_prob <= 1, "flip_prob must be in [0, 1]"),
      (0 <= cfg.brightness_delta <= 255, "brightness_delta must be in [0, 255]"),
      (
          is_range(cfg.contrast_range),
          f"contrast_range must be (low, high) with 0 < low <= high, got {cfg.contrast_range}",
      ),
      (
          is_range(cfg.saturation_range),
          f"saturation_range must be (low, high) with 0 < low <= high, got {cfg.saturation_range}",
      ),
      (0 <= cfg.hue_delta <= 180, "hue_delta must be in [0, 180]"),
      (cfg.size_divisor >= 1, "size_divisor must be >= 1"),
      *normalization_checks(cfg),
      (
          cfg.demo_image_size >= 16,
          f"demo_image_size must be >= 16, got {cfg.demo_image_size}",
      ),
      *((cfg[f] > 0, f"{f} must be > 0, got {cfg[f]}") for f in ("demo_num_train", "demo_num_val")),
      *loader_checks(cfg),
  ]
  if cfg.source == "demo":
    checks.append(
        (
            cfg.num_classes == DEMO_NUM_CLASSES and not cfg.reduce_zero_label,
            f"the demo has {DEMO_NUM_CLASSES} classes (0 = background) and no zero label to "
            "reduce: num_classes = 5, reduce_zero_label = False",
        )
    )
  check_all(checks)
