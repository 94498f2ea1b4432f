"""FEC-Small on ImageNet-1k with the official recipe (docs/official-code.md Sec. 8).

  python train.py --config=configs/fec_small.py --workdir=DIR --config.data.root=/path/to/imagenet

Every field can be overridden on the command line (`--config.base_lr=2e-3`); the config is
locked, so a misspelt field fails at once. `config.data` is fec_jax.data.default_config()
(see its docstring for the data fields).
"""

import ml_collections

from fec_jax import data


def get_config(model: str = "fec_small", drop_path_rate: float = 0.1) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "classification"  # fec_jax.tasks
  c.model = ml_collections.ConfigDict()
  c.model.name = model  # a registered classification variant (fec_jax.list_models())
  c.model.drop_path_rate = drop_path_rate
  c.model.dtype = "bfloat16"  # compute dtype; params and optimizer state stay float32

  c.data = data.default_config()  # ImageNet folder layout, official augmentation and Mixup/CutMix

  c.seed = 0
  # Fine-tuning: start a fresh workdir from these weights (a convert_torch_weights.py output or a
  # train.py workdir); matching params are loaded, a head with another num_classes is
  # re-initialized. A workdir that holds a checkpoint resumes instead.
  c.init_from = ""
  c.init_from_ema = False  # take init_from's EMA weights (a train.py workdir that kept them)
  c.init_from_step = -1  # the saved step of init_from to take; -1: its latest
  c.init_from_required = False  # True: a fresh run without init_from is an error (a fine-tune)
  c.global_batch_size = 1024  # across all devices and hosts
  c.eval_batch_size = 1024
  # Optimizer: AdamW, lr = base_lr * global_batch_size / lr_base_batch_size, wd on >1-D params
  # but ClusterPool's conv_f (no gradient: the official training never changes it).
  c.base_lr = 1e-3
  c.lr_base_batch_size = 1024  # the linear scaling rule's base; 0 = base_lr unscaled
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.05
  c.weight_decay_on = "matrices"  # > 1-D params (timm); "all" = every param (mmseg)
  c.grad_clip_norm = 0.0  # 0 = no clipping (the official default)
  # A regular expression matched at the start of each param's '/'-joined path (re.match): the
  # params it matches are frozen (no update, weight decay or optimizer moments); '' = none.
  # E.g. '(?!head/)' = all but the head (a linear probe), 'patch_embed/|network_0/' = the stem
  # and first stage; a segmenter's paths start with backbone/, neck/ or decode_head/.
  c.frozen = ""
  # lr_schedule "cosine_epochs": per-epoch warmup from warmup_lr, cosine over `epochs`, then min_lr
  # for cooldown; "poly": per step, (1 - step / schedule_steps) ** poly_power down to min_lr.
  c.lr_schedule = "cosine_epochs"
  c.schedule_steps = 0  # the poly schedule's length in steps (not used by cosine_epochs)
  c.poly_power = 0.9
  c.epochs = 300
  c.warmup_epochs = 5
  c.cooldown_epochs = 10
  c.warmup_lr = 1e-6
  c.min_lr = 1e-6
  c.max_steps = 0  # > 0: stop after this many steps of the schedule (smoke tests)
  c.ema_decay = 0.9998  # timm ModelEmaV2; 0 = no EMA

  c.log_every_steps = 100
  c.eval_every_epochs = 1
  c.eval_every_steps = 0  # > 0: evaluate every this many steps instead of every N epochs
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 3
  return c.lock()  # a misspelt field (c.max_step = 3) fails, in Python as on the command line
