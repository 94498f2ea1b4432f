"""Semantic FPN with FEC-Large on ADE20K: the recipe of configs/fpn_fec_small_ade20k.py
(the neck's input channels follow the backbone)."""

from configs import fpn_fec_small_ade20k


def get_config():
  return fpn_fec_small_ade20k.get_config(model="fpn_fec_large")
