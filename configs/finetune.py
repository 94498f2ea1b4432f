"""Fine-tuning FEC-Small's ImageNet weights on a class-folder dataset.

  python train.py --config=configs/finetune.py --workdir=DIR --config.data.root=/data/pets \\
      --config.data.num_classes=37 --config.init_from=ckpt/fec_small   # converter output or workdir

The data is the folder layout of configs/fec_small.py (root/train/<class>/*, root/val/<class>/*);
the head is re-initialized for data.num_classes; a fresh run without init_from is an error
(init_from_required). Where the numbers come from: the FEC authors publish no fine-tuning recipe,
so this follows ConvNeXt's ImageNet fine-tuning recipe (Liu et al. 2022, Table A3 "fine-tuning":
AdamW, lr 5e-5 at batch 512, weight decay 1e-8, 30 epochs, no warmup) with fec-jax's linear
scaling rule (base_lr is the lr at batch 1024, as FEC's 1e-3), and keeps the official FEC
augmentation and drop path. EMA is off: timm's 0.9998 averages over ~5,000 steps, more than a
small dataset's whole fine-tune.
"""

from configs import fec_small


def get_config():
  c = fec_small.get_config()
  c.global_batch_size = 256
  c.eval_batch_size = 256
  c.init_from_required = True  # this lr and schedule are for pretrained weights, not random ones
  c.base_lr = 1e-4  # = 5e-5 at batch 512 (linear scaling)
  c.weight_decay = 1e-8
  c.epochs = 30
  c.warmup_epochs = 0
  c.cooldown_epochs = 0
  c.ema_decay = 0.0
  c.log_every_steps = 20
  c.checkpoint_every_steps = 500
  return c
