"""Semantic FPN with FEC-Small on ADE20K, the authors' recipe (segmentation/configs/sem_fpn/
fpn_fec_small_ade20k_80k.py of their repository, on mmsegmentation 0.24).

  python train.py --config=configs/fpn_fec_small_ade20k.py --workdir=DIR \\
      --config.data.root=/data/ADEChallengeData2016 --config.init_from=IMAGENET_CKPT

init_from: the ImageNet classifier (a convert_torch_weights.py output of fec_small or a train.py
workdir); its backbone params are loaded as mmseg's Pretrained init does (fec_jax.tasks.
segmentation). Fields are those of configs/fec_small.py; config.data is fec_jax.data.
ade20k_config() (the mmseg train and test pipelines).
"""

import ml_collections

from configs import fec_small
from fec_jax import data


def get_config(model: str = "fpn_fec_small") -> ml_collections.ConfigDict:
  c = fec_small.get_config(model=model)
  c.task = "segmentation"  # fec_jax.tasks.segmentation
  # The official config sets no drop path; the backbone's default is taken to be 0, as in the
  # PoolFormer dense backbones the released code builds on (inferred, not read in their code).
  c.model.drop_path_rate = 0.0
  c.data = data.ade20k_config()
  c.global_batch_size = 16  # 4 GPUs x 4 images
  c.eval_batch_size = 16  # not used: the segmentation evaluator takes one image at a time
  # Optimizer: AdamW(lr 1e-4, weight_decay 1e-4), no clipping (optimizer_config = dict()). The
  # config has no paramwise_cfg, so mmcv's DefaultOptimizerConstructor puts every parameter
  # (norms, biases, sim_alpha/beta included) in one group with weight_decay: "all". The lr is
  # not scaled with the batch (gpu_multiples = 1).
  c.base_lr = 1e-4
  c.lr_base_batch_size = 0
  c.weight_decay = 1e-4
  c.weight_decay_on = "all"
  # lr_config = dict(policy='poly', power=0.9, min_lr=0.0, by_epoch=False): per iteration,
  # no warmup, over the 80,000 iterations of the IterBasedRunner.
  c.lr_schedule = "poly"
  c.schedule_steps = 80_000
  c.poly_power = 0.9
  c.min_lr = 0.0
  c.warmup_epochs = 0  # epochs, warmup_*, cooldown_epochs: not used by the poly schedule
  c.ema_decay = 0.0  # mmseg keeps no EMA
  c.log_every_steps = 50  # mmseg's default log interval
  c.eval_every_steps = 8000  # evaluation = dict(interval=8000, metric='mIoU')
  c.checkpoint_every_steps = 8000  # checkpoint_config interval 8000
  return c
