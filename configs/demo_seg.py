"""The embedded segmentation demo: Semantic FPN with FEC-Small on synthetic shapes (discs,
squares, triangles and crosses on gradient backgrounds, 64x64, 5 classes, generated on the fly
by fec_jax.data; 2,000 train and 200 held-out images), from scratch, no download. CPU-sized.

  python train.py --config=configs/demo_seg.py --workdir=/tmp/fec_seg_demo
  python eval.py --config=configs/demo_seg.py --workdir=/tmp/fec_seg_demo
  python visualize_seg.py --config=configs/demo_seg.py --workdir=/tmp/fec_seg_demo --output=seg.png
"""
from configs import fpn_fec_small_ade20k
from fec_jax import data


def get_config():
  c = fpn_fec_small_ade20k.get_config()
  c.model.dtype = "float32"  # bfloat16 is slower on CPU
  c.data = data.seg_demo_config()
  c.global_batch_size = 8
  c.base_lr = 1e-3  # from scratch in a few hundred steps: 10x the fine-tuning recipe's lr
  c.schedule_steps = 600
  c.log_every_steps = 10
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 2
  return c
