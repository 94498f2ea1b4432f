"""PyTorch rendition of mmsegmentation 0.24's Semantic FPN around the reference seg backbone.

A test fixture, NOT part of the fec_jax package: written from mmseg 0.24's semantics (the
EncoderDecoder's backbone / neck / decode_head, mmcv's ConvModule, mmseg's FPN, FPNHead, Upsample
and BaseDecodeHead.cls_seg) on top of tests/torch_reference.py's `fec_*_seg`, with mmseg's
state-dict keys, so that fec_jax.fpn can be checked against an independent rendition. SyncBN is
BatchNorm2d here (one process: the same statistics).

  create_torch_segmenter("fpn_fec_small", num_classes=150) -> SemanticFPN
  perturbed_segmenter("fpn_fec_small", dtype, seed) -> the same, weights and BN statistics moved
  SemanticFPN(x) -> logits [B, num_classes, H/4, W/4]; .backbone.assignments as in torch_reference
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_reference

NECK_CHANNELS = 256
HEAD_CHANNELS = 128
FEATURE_STRIDES = (4, 8, 16, 32)


class ConvModule(nn.Module):
  """mmcv ConvModule (conv, norm, act order); bias='auto': a bias only without a norm."""

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      kernel_size: int,
      padding: int = 0,
      norm: bool = False,
      act: bool = False,
  ):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=not norm)
    if norm:
      self.bn = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)
    self.activate = nn.ReLU() if act else None

  def forward(self, x):
    x = self.conv(x)
    if hasattr(self, "bn"):
      x = self.bn(x)
    return self.activate(x) if self.activate is not None else x


class FPN(nn.Module):
  """mmseg FPN with norm_cfg=None, act_cfg=None, upsample_cfg=dict(mode='nearest'), 4 outputs."""

  def __init__(self, in_channels: List[int], out_channels: int = NECK_CHANNELS):
    super().__init__()
    self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
    self.fpn_convs = nn.ModuleList(
        ConvModule(out_channels, out_channels, 3, padding=1) for _ in in_channels
    )

  def forward(self, inputs):
    laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
    for i in range(len(laterals) - 1, 0, -1):
      prev_shape = laterals[i - 1].shape[2:]
      up = F.interpolate(laterals[i], size=prev_shape, mode="nearest")
      laterals[i - 1] = laterals[i - 1] + up
    return [self.fpn_convs[i](laterals[i]) for i in range(len(laterals))]


class Upsample(nn.Module):
  """mmseg.ops.Upsample(scale_factor=2, mode='bilinear', align_corners=False)."""

  def __init__(self, scale_factor: float = 2.0):
    super().__init__()
    self.scale_factor = float(scale_factor)

  def forward(self, x):
    size = [int(t * self.scale_factor) for t in x.shape[-2:]]
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


class FPNHead(nn.Module):
  """mmseg FPNHead (input_transform 'multiple_select') with BaseDecodeHead's cls_seg."""

  def __init__(
      self,
      in_channels: List[int],
      num_classes: int,
      channels: int = HEAD_CHANNELS,
      feature_strides=FEATURE_STRIDES,
      dropout_ratio: float = 0.1,
  ):
    super().__init__()
    self.feature_strides = feature_strides
    self.scale_heads = nn.ModuleList()
    for i, stride in enumerate(feature_strides):
      length = max(1, int(np.log2(stride) - np.log2(feature_strides[0])))
      layers = []
      for k in range(length):
        layers.append(
            ConvModule(
                in_channels[i] if k == 0 else channels, channels, 3, padding=1, norm=True, act=True
            )
        )
        if stride != feature_strides[0]:
          layers.append(Upsample(2))
      self.scale_heads.append(nn.Sequential(*layers))
    self.dropout = nn.Dropout2d(dropout_ratio)
    self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

  def forward(self, inputs):
    output = self.scale_heads[0](inputs[0])
    for i in range(1, len(self.feature_strides)):
      output = output + F.interpolate(
          self.scale_heads[i](inputs[i]),
          size=output.shape[2:],
          mode="bilinear",
          align_corners=False,
      )
    return self.conv_seg(self.dropout(output))


class SemanticFPN(nn.Module):
  """EncoderDecoder.encode_decode without the final resize: the head's stride-4 logits."""

  def __init__(self, backbone: str, num_classes: int = 150):
    super().__init__()
    self.backbone = torch_reference.create_torch_model(backbone)
    dims = list(torch_reference.VARIANTS[backbone].embed_dims)
    self.neck = FPN(dims)
    self.decode_head = FPNHead([NECK_CHANNELS] * 4, num_classes)

  def forward(self, x):
    return self.decode_head(self.neck(self.backbone(x)))


def create_torch_segmenter(name: str, num_classes: int = 150) -> SemanticFPN:
  """'fpn_fec_small' -> Semantic FPN on fec_small_seg."""
  return SemanticFPN(name.removeprefix("fpn_") + "_seg", num_classes)


def perturbed_segmenter(name: str, dtype=torch.float32, seed: int = 0) -> SemanticFPN:
  """An eval-mode segmenter with every weight and BatchNorm statistic moved away from its init,
  and num_batches_tracked as after mmseg's 80k iterations."""
  torch.manual_seed(seed)
  model = create_torch_segmenter(name).eval().to(dtype)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1))
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.add_(torch.randn_like(m.running_mean) * 0.1)
        m.running_var.mul_(torch.rand_like(m.running_var) + 0.5)
        m.num_batches_tracked.fill_(80_000)
  return model
