"""Input pipelines: ImageNet classification and ADE20K semantic segmentation.

Public API, classification:
  default_config(), demo_config(), validate(cfg)      -- config.data fields (config.py)
  create_loader(cfg, split, global_batch_size, seed, shard_index, shard_count, num_epochs)
  create_dataset(...)  -- the same as a re-iterable dataset (one pass per iter())
  num_examples(cfg, split), steps_per_epoch(cfg, global_batch_size, shard_count),
  num_eval_batches(cfg, global_batch_size)             -- pipeline.py
  split_name(cfg, 'train' | 'val')                     -- the config's name of it (sources.py)
  split_holding(cfg, path)                             -- the split folder a path lies in
  tfds_data_dir(cfg.tfds_data_dir)                     -- the folder TFDS reads (sources.py)
  recorded_fields(cfg)                                 -- what config.json records otherwise
  device_transforms.normalize(images, mean, std), .erase(key, images, boxes, mode)
                                                       -- on device: uint8 -> float, erasing fill
  mixup.mixup_cutmix(rng, images, labels, num_classes, ...)  -- on-device Mixup/CutMix
  DataNotFoundError                                    -- missing/empty data (sources.py)
Segmentation (ADE20K, the authors' mmseg 0.24 recipe; the synthetic shapes demo):
  ade20k_config(), seg_demo_config(), seg_validate(cfg)  -- seg_config.py
  create_seg_loader(cfg, split, global_batch_size, seed, shard_index, shard_count, num_epochs)
  seg_num_examples(cfg, split), seg_steps_per_epoch(cfg, global_batch_size, shard_count),
  seg_num_eval_examples(cfg, shard_count),
  seg_check_val(cfg, count)                            -- seg_pipeline.py
  seg_device_transforms.normalize(images, valid, mean, std)  -- on device, padding -> 0
  The metric: fec_jax.miou.
Shared by both pipelines (loader.py: train and val order, bad-file replacement, worker processes):
  data_location(cfg)                                   -- where the records are, for messages
Class names: classes.classification_names(cfg, num_classes), classes.segmentation_names(cfg),
  classes.imagenet_names(), classes.ade20k()              -- classes.py
  label_names(cfg) -> LabelNames | None                -- the names the data gives its labels
  label_names_change(then, now)                        -- a run's labels naming other classes
Benchmarks: python -m fec_jax.data.bench (classification), python -m fec_jax.data.seg_bench
"""

from fec_jax.data.classes import LabelNames, label_names, label_names_change
from fec_jax.data.config import default_config, demo_config, validate
from fec_jax.data.loader import data_location
from fec_jax.data.pipeline import (
    create_dataset,
    create_loader,
    num_eval_batches,
    num_examples,
    steps_per_epoch,
)
from fec_jax.data.seg_config import ade20k_config
from fec_jax.data.seg_config import demo_config as seg_demo_config
from fec_jax.data.seg_config import validate as seg_validate
from fec_jax.data.seg_pipeline import (
    create_seg_loader,
    seg_check_val,
    seg_num_eval_examples,
    seg_num_examples,
    seg_steps_per_epoch,
)
from fec_jax.data.sources import (
    DataNotFoundError,
    recorded_fields,
    split_holding,
    split_name,
    tfds_data_dir,
)

__all__ = [
    "default_config",
    "demo_config",
    "validate",
    "create_loader",
    "create_dataset",
    "num_examples",
    "steps_per_epoch",
    "num_eval_batches",
    "data_location",
    "split_name",
    "split_holding",
    "tfds_data_dir",
    "recorded_fields",
    "LabelNames",
    "label_names",
    "label_names_change",
    "DataNotFoundError",
    "ade20k_config",
    "seg_demo_config",
    "seg_validate",
    "create_seg_loader",
    "seg_num_examples",
    "seg_check_val",
    "seg_steps_per_epoch",
    "seg_num_eval_examples",
]
