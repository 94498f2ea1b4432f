"""Semantic FPN with an FEC backbone (the paper's ADE20K segmenter), NHWC, in Flax (linen).

The official segmentation models are mmsegmentation 0.24's EncoderDecoder with the `fec_*_seg`
backbone, the FPN neck and the FPNHead decode head (docs/official-code.md Sec. 10; Sec. 6 for the
backbone's four maps). Module names mirror mmseg's state-dict keys so that conversion is a renaming:
  backbone.network.0.2.token_mixer.f        flax backbone/network_0/token_mixer/f, block 2
  neck.lateral_convs.{i}.conv               flax neck/lateral_convs_{i}/conv
  neck.fpn_convs.{i}.conv                   flax neck/fpn_convs_{i}/conv
  decode_head.scale_heads.{i}.{j}.conv/.bn  flax decode_head/scale_heads_{i}_{j}/conv, /bn
  decode_head.conv_seg                      flax decode_head/conv_seg
Variables: {"params", "batch_stats"}; BatchNorm running statistics are `batch_stats` {mean, var}
(torch running_mean / running_var). mmseg's `num_batches_tracked` is not kept: with momentum 0.1
BatchNorm never reads it.

    model = fec_jax.create_model("fpn_fec_small")                  # num_classes=150 (ADE20K)
    variables = fec_jax.init_variables(model, key, (1, 512, 512, 3))
    logits = model.apply(variables, images)                        # [B, H/4, W/4, 150]
    logits, state = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                rngs={"dropout": key})
    labels = fpn.predict(model, variables, images, (h, w))         # [B, h, w] int32
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fec_jax import clustering
from fec_jax.clustering import Aggregation, AssignGrad
from fec_jax.model import FEC, SEGMENTERS, Dtype, Variant, model_name

NECK_CHANNELS = 256  # FPN out_channels of the official configs
HEAD_CHANNELS = 128  # FPNHead channels
FEATURE_STRIDES = (4, 8, 16, 32)

# Initialization as mmseg 0.24 leaves it: the FPN's init_cfg Xavier(uniform) on its convs, bias 0;
# the head's ConvModules keep mmcv's kaiming_init (normal, fan_out, relu gain), bias 0, BN 1 / 0;
# conv_seg normal(std 0.01), bias 0 (BaseDecodeHead's init_cfg).
xavier_uniform = nn.initializers.xavier_uniform()
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
conv_seg_init = nn.initializers.normal(0.01)


def resize_bilinear(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
  """mmseg `resize(x, size, mode='bilinear', align_corners=False)` of an NHWC map.

  Half-pixel centers, no antialiasing: jax.image.resize antialiases when it downsamples unless told
  not to, F.interpolate never does. Same values as F.interpolate up and down (tests/test_fpn.py).
  """
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, *size, c), "bilinear", antialias=False)


class BatchNorm(nn.Module):
  """torch BatchNorm2d over the batch and spatial axes of an NHWC map: eps 1e-5, momentum 0.1.

  Written out because flax's BatchNorm updates the running variance with the biased batch variance;
  torch (and so mmseg's SyncBN) normalizes with the biased one but tracks the unbiased one.
  Statistics are those of the whole array: under jit with the batch sharded over a mesh, the mean
  over axis 0 of the global array is the global batch's mean (XLA inserts the all-reduce), which is
  what the official SyncBN computes across GPUs.
  """

  momentum: float = 0.1  # torch convention: new = (1 - momentum) * running + momentum * batch
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):  # [B, H, W, C]
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    x32 = clustering.at_least_f32(x)
    if train:
      mean = x32.mean(axis=(0, 1, 2))
      var = jnp.square(x32 - mean).mean(axis=(0, 1, 2))  # biased: normalizes the batch
      if not self.is_initializing():
        n = x.size // c
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * var * (
            n / (n - 1)
        )  # unbiased, as torch
    else:
      mean, var = running_mean.value, running_var.value
    y = (x32 - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


class ConvModule(nn.Module):
  """mmcv ConvModule: `conv` (bias unless normed), optional `bn`, optional ReLU.

  A 1x1 conv is a Dense over channels, as in the backbone (the converter's layout convention).
  """

  features: int
  kernel: int
  kernel_init: Any
  norm: bool = False
  act: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    bias = not self.norm  # mmcv bias='auto'
    if self.kernel == 1:
      x = nn.Dense(
          self.features, use_bias=bias, dtype=self.dtype, kernel_init=self.kernel_init, name="conv"
      )(x)
    else:
      pad = self.kernel // 2
      x = nn.Conv(
          self.features,
          (self.kernel, self.kernel),
          padding=((pad, pad), (pad, pad)),
          use_bias=bias,
          dtype=self.dtype,
          kernel_init=self.kernel_init,
          name="conv",
      )(x)
    if self.norm:
      x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
    return nn.relu(x) if self.act else x


class FPN(nn.Module):
  """mmseg FPN (no norm, no activation): 1x1 lateral convs, top-down nearest 2x upsampling added
  level by level, 3x3 output convs. mmseg resizes to the finer lateral's size with nearest; for
  inputs that are multiples of 32 that is exactly 2x."""

  out_channels: int = NECK_CHANNELS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
    laterals = [
        ConvModule(
            self.out_channels, 1, xavier_uniform, dtype=self.dtype, name=f"lateral_convs_{i}"
        )(x)
        for i, x in enumerate(features)
    ]
    for i in range(len(laterals) - 1, 0, -1):  # coarse to fine, each sum feeds the next
      up = jnp.repeat(jnp.repeat(laterals[i], 2, axis=1), 2, axis=2)  # nearest 2x
      laterals[i - 1] = laterals[i - 1] + up
    return [
        ConvModule(self.out_channels, 3, xavier_uniform, dtype=self.dtype, name=f"fpn_convs_{i}")(x)
        for i, x in enumerate(laterals)
    ]


class FPNHead(nn.Module):
  """mmseg FPNHead: per level, max(1, log2(stride / 4)) ConvModules (3x3, BN, ReLU), each followed
  by a bilinear 2x upsampling for the coarser levels (strides 8, 16, 32); the levels summed at
  stride 4; then cls_seg: Dropout2d (whole channels, as mmseg 0.24's BaseDecodeHead) and the 1x1
  conv_seg."""

  num_classes: int
  channels: int = HEAD_CHANNELS
  feature_strides: tuple[int, ...] = FEATURE_STRIDES
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], train: bool = False) -> jnp.ndarray:
    first = self.feature_strides[0]
    output = None
    for i, (x, stride) in enumerate(zip(features, self.feature_strides)):
      upsample = stride != first
      for k in range(max(1, int(math.log2(stride) - math.log2(first)))):
        j = 2 * k if upsample else k  # nn.Sequential index: the Upsample modules sit in between
        x = ConvModule(
            self.channels,
            3,
            kaiming_normal_fan_out,
            norm=True,
            act=True,
            dtype=self.dtype,
            name=f"scale_heads_{i}_{j}",
        )(x, train)
        if upsample:
          x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
      # mmseg resizes each level to the first one's size: it already is (strides 4, 8, 16, 32)
      output = x if output is None else output + x  # [B, H/4, W/4, channels]
    output = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), name="dropout")(
        output, deterministic=not train
    )  # Dropout2d: one draw per (sample, channel)
    logits = nn.Dense(
        self.num_classes, dtype=self.dtype, kernel_init=conv_seg_init, name="conv_seg"
    )(output)
    return clustering.at_least_f32(logits)


class SemanticFPN(nn.Module):
  """FEC backbone (a `_seg` variant) + FPN + FPNHead. Takes NHWC ImageNet-normalized images whose
  sides are multiples of 32; returns the logits at stride 4, [B, H/4, W/4, num_classes].

  `train=True` uses batch statistics in the head's BatchNorms (pass mutable=["batch_stats"] to get
  the updated running statistics), dropout and drop path (rng "dropout"). `unroll_stages` as in
  fec_jax.model.FEC.
  """

  variant: Variant
  num_classes: int = 150
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.1
  aggregation: Aggregation = "auto"
  assign_grad: AssignGrad = "official"
  unroll_stages: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    features = FEC(
        self.variant,
        drop_path_rate=self.drop_path_rate,
        aggregation=self.aggregation,
        assign_grad=self.assign_grad,
        unroll_stages=self.unroll_stages,
        dtype=self.dtype,
        name="backbone",
    )(images, train)
    features = FPN(dtype=self.dtype, name="neck")(features)
    return FPNHead(
        self.num_classes, dropout_rate=self.dropout_rate, dtype=self.dtype, name="decode_head"
    )(features, train)


def predict(model: SemanticFPN, variables, images, out_hw: Sequence[int]) -> jnp.ndarray:
  """Full-size prediction [B, out_h, out_w] int32 as mmseg 0.24's whole-image inference makes it:
  the logits resized bilinearly (align_corners=False, no antialiasing) to the input's size
  (EncoderDecoder.encode_decode), then to `out_hw`, the original image's size (whole_inference
  with rescale), then argmax over the classes. Two resizes, not one: their results differ.

  `images` are unpadded (the test pipeline's resize to multiples of 32 pads nothing).
  `jax.jit(lambda v, x: fpn.predict(model, v, x, (h, w)))` compiles it for one output size.
  A model of fec_jax's other than a segmenter, or an `out_hw` that is not (h, w), is a ValueError.
  """
  if isinstance(model, FEC):  # a classifier's logits or a backbone's maps: not a label map
    raise ValueError(
        f"fpn.predict takes a segmenter ({', '.join(SEGMENTERS)}), got {model_name(model)}"
    )
  if np.shape(out_hw) != (2,):
    raise ValueError(f"out_hw is (h, w), the size to predict at, got {out_hw!r}")
  logits = model.apply(variables, images)  # [B, H/4, W/4, K]
  logits = resize_bilinear(logits, images.shape[1:3])  # [B, H, W, K]
  return jnp.argmax(resize_bilinear(logits, tuple(out_hw)), axis=-1).astype(jnp.int32)
