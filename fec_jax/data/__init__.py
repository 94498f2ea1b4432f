"""ImageNet input pipeline (issue 4): sources, the official augmentation recipe, grain loader.

Public API:
  default_config(), demo_config(), validate(cfg)      -- config.data fields (config.py)
  create_loader(cfg, split, global_batch_size, seed, shard_index, shard_count, num_epochs)
  create_dataset(...)  -- the same as a re-iterable dataset (one pass per iter())
  num_examples(cfg, split), steps_per_epoch(cfg, global_batch_size, shard_count),
  num_eval_batches(cfg, global_batch_size)             -- pipeline.py
  device_transforms.normalize(images, mean, std), .erase(key, images, boxes, mode)
                                                       -- on device: uint8 -> float, erasing fill
  mixup.mixup_cutmix(rng, images, labels, num_classes, ...)  -- on-device Mixup/CutMix
  DataNotFoundError                                    -- missing/empty data (sources.py)
Benchmark: python -m fec_jax.data.bench
"""

from fec_jax.data.config import default_config, demo_config, validate
from fec_jax.data.pipeline import (
    create_dataset,
    create_loader,
    num_eval_batches,
    num_examples,
    steps_per_epoch,
)
from fec_jax.data.sources import DataNotFoundError

__all__ = [
    "default_config",
    "demo_config",
    "validate",
    "create_loader",
    "create_dataset",
    "num_examples",
    "steps_per_epoch",
    "num_eval_batches",
    "DataNotFoundError",
]
