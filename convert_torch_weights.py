"""Convert official FEC PyTorch checkpoints to Orbax, or Orbax back to PyTorch (--to-torch).

python convert_torch_weights.py --model fec_small --input fec_small.pth.tar --output ckpt/fec_small
python convert_torch_weights.py --model fec_small --input ckpt/fec_small --output back.pth --to-torch
python convert_torch_weights.py --input runs/fec_small --output back.pth --to-torch [--step=N] [--ema]
"""

import sys

from fec_jax import cli
from fec_jax.convert import main

if __name__ == "__main__":
  with cli.interruptible():
    sys.exit(main())
