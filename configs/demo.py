"""The embedded demo: FEC-Small on scikit-learn's bundled digits (8x8 upscaled to 32x32,
10 classes, stratified 20% held out), no download. CPU-sized: a few minutes on 2 cores.

  python train.py --config=configs/demo.py --workdir=/tmp/fec_demo
"""

from configs import fec_small
from fec_jax import data


def get_config():
  c = fec_small.get_config()
  c.model.drop_path_rate = 0.0
  c.data = data.demo_config()  # 32x32 digits, light crop augmentation, no Mixup/CutMix
  c.global_batch_size = 128
  c.eval_batch_size = 360
  c.base_lr = 8e-3  # -> lr 1e-3 at batch 128 (linear scaling rule)
  c.epochs = 14
  c.warmup_epochs = 0  # a warmup epoch would start at lr 1e-6: too slow for 14 epochs
  c.cooldown_epochs = 0
  c.ema_decay = 0.99
  c.log_every_steps = 10
  c.eval_every_epochs = 2
  c.checkpoint_every_steps = 50
  c.keep_checkpoints = 2
  return c
