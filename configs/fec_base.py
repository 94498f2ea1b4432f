"""FEC-Base on ImageNet-1k with the official recipe; fields as in configs/fec_small.py.

The reference states drop path 0.1 for the small model only; base keeps 0.1 (override with
--config.model.drop_path_rate).
"""

from configs import fec_small


def get_config():
  return fec_small.get_config(model="fec_base")
