"""FEC in Flax (linen), NHWC: ClusterPool, Cluster, Mlp, ClusterBlock, FEC and the variant table.

Module and parameter names mirror the official PyTorch state dict (docs/official-code.md
Sec. 1) so that conversion is a renaming: torch `network.1.conv_f` is flax `network_1/conv_f`.
The blocks of a stage run as one `nn.scan` with their params stacked on a leading block axis:
torch `network.0.2.token_mixer.f` is block 2 of flax `network_0/token_mixer/f`.

Every clustering layer sows its hard assignment into the `intermediates` collection:
  Cluster      [B, heads, H, W] int32: fold_region * M + center index within the region (stacked
               per stage, [depth, B, heads, H, W])
  ClusterPool  [B, H, W] int32: row-major index of the output pixel (the center) in [H/2, W/2]
ClusterPool also sows its `centers` (Eq. 4) and `representatives` (Eq. 6), both [B, H/2, W/2, D].
`cluster_assignments` collects the assignments from `model.apply(..., mutable=["intermediates"])`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from typing import Any, Literal, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fec_jax import clustering, reporting
from fec_jax.clustering import Aggregation, AssignGrad

Dtype = Any


# Initialization (docs/official-code.md Sec. 5). PyTorch's default Conv2d init is
# uniform(+-1/sqrt(fan_in)) for weights and biases; nn.Linear weights are trunc_normal(std .02)
# cut at +-2 absolute (= 100 std).
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
linear_kernel_init = nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)


def torch_conv_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def conv1x1(features: int, fan_in: int, name: str, dtype: Dtype) -> nn.Dense:
  """A 1x1 Conv2d of the official code, as a Dense over the channel axis (NHWC;
  docs/official-code.md Sec. 1)."""
  return nn.Dense(
      features,
      dtype=dtype,
      kernel_init=torch_conv_kernel_init,
      bias_init=torch_conv_bias_init(fan_in),
      name=name,
  )


def group_norm(name: str, dtype: Dtype) -> nn.GroupNorm:
  """GroupNorm(1, C): one group over (H, W, C) per sample, eps 1e-5, statistics in fp32
  (docs/official-code.md Sec. 3, ClusterBlock)."""
  return nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False, dtype=dtype, name=name)


def layer_name(module: nn.Module) -> str:
  """The official module name of a bound layer, for messages: 'network.1', or
  'network.0.*.token_mixer' for a layer of every block of a stage."""
  return ".".join(torch_module_path(module.path, "*")) if module.path else type(module).__name__


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the variant table (docs/official-code.md Sec. 2)."""

  depths: tuple[int, ...]
  dims: tuple[int, ...]
  mlp_ratios: tuple[int, ...] = (8, 8, 4, 4)
  heads: tuple[int, ...] = (4, 4, 8, 8)
  head_dim: int = 24
  centers: tuple[tuple[int, int], ...] = ((4, 4), (4, 4), (2, 2), (2, 2))
  folds: tuple[int, ...] = (1, 1, 1, 1)
  dense_outputs: bool = False  # seg/det backbones: four normalized stage maps instead of logits


def _dense_variants(base: dict[str, Variant]) -> dict[str, Variant]:
  """The seg and det backbones of each classifier (docs/official-code.md Sec. 2 and 6)."""
  seg = dict(centers=((10, 10), (10, 10), (5, 5), (5, 5)), dense_outputs=True)
  det = dict(centers=((7, 7),) * 4, folds=(2, 2, 1, 1), dense_outputs=True)
  out = {}
  for name, v in base.items():
    out[f"{name}_seg"] = dataclasses.replace(v, **seg)
    out[f"{name}_det"] = dataclasses.replace(v, **det)
  return out


_CLASSIFICATION = {
    "fec_small": Variant(depths=(3, 4, 5, 2), dims=(32, 64, 196, 320)),
    "fec_base": Variant(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), head_dim=32),
    "fec_large": Variant(
        depths=(4, 4, 12, 4), dims=(64, 128, 320, 512), heads=(6, 6, 12, 12), head_dim=32
    ),
}
VARIANTS: dict[str, Variant] = {**_CLASSIFICATION, **_dense_variants(_CLASSIFICATION)}
# Semantic FPN segmenters (fec_jax.fpn) and their backbones.
SEGMENTERS: dict[str, str] = {f"fpn_{name}": f"{name}_seg" for name in _CLASSIFICATION}


class Mlp(nn.Module):
  """fc1 (C -> ratio*C), exact GELU, fc2 back to C, over the channel axis (docs/official-code.md
  Sec. 3, ClusterBlock). Not the MLP of Eq. 7: in the code, that is Cluster's one 1x1 `proj`."""

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C]
    dim = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=linear_kernel_init, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(dim, dtype=self.dtype, kernel_init=linear_kernel_init, name="fc2")(x)


class Cluster(nn.Module):
  """Clustering-based feature encoding, the token mixer of a ClusterBlock
  (docs/official-code.md Sec. 3).

  Shapes below: E heads of D = head_dim channels, r = fold; G = B*E*r*r groups (fec_jax.clustering),
  each of N = hr*wr points (an hr x wr = H/r x W/r region) and M = centers[0] * centers[1] centers.
  """

  heads: int
  head_dim: int
  centers: tuple[int, int]
  fold: int = 1
  aggregation: Aggregation = "auto"
  assign_grad: AssignGrad = "official"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C]
    _, h, w, dim = x.shape
    clustering.check_divisible(layer_name(self), (h, w), self.fold)
    width = self.heads * self.head_dim
    value = conv1x1(width, dim, "v", self.dtype)(x)
    feat = conv1x1(width, dim, "f", self.dtype)(x)
    alpha = self.param("sim_alpha", nn.initializers.ones, (1,))
    beta = self.param("sim_beta", nn.initializers.zeros, (1,))

    r = self.fold
    hr, wr = h // r, w // r
    feat, value = self._to_groups(feat), self._to_groups(value)  # [G, hr, wr, D]
    g, m = feat.shape[0], self.centers[0] * self.centers[1]
    # Eq. 7's sigma(alpha M + beta); the assignment is its argmax, as the code does
    # (docs/official-code.md Sec. 3, Cluster 4)
    clustered = clustering.cluster(
        feat,
        value,
        self.centers,
        similarity_map=lambda cosine: jax.nn.sigmoid(beta + alpha * cosine),
        aggregation=self.aggregation,
        assign_grad=self.assign_grad,
    )  # Eqs. 4-6
    assignment = clustered.assignment  # [G, N]
    out = clustering.dispatch(
        clustered.representatives, clustered.similarity, assignment, self.aggregation, clustered.st
    )  # Eq. 7, [G, N, D]

    # the sown assignment [B, E, H, W]: region index * M + center index within the region
    region = jnp.arange(r * r, dtype=jnp.int32).reshape(1, r * r, 1) * m  # [1, r*r, 1]
    labels = assignment.reshape(-1, r * r, hr * wr) + region  # [B*E, r*r, N]
    labels = self._from_groups(labels.reshape(g, hr, wr, 1))  # [B, H, W, E]
    self.sow("intermediates", "assignment", labels.transpose(0, 3, 1, 2))
    out = self._from_groups(out.reshape(g, hr, wr, -1).astype(self.dtype))  # [B, H, W, E*D]
    # [B, H, W, C]: docs/official-code.md Sec. 3, Cluster 7
    return conv1x1(dim, width, "proj", self.dtype)(out)

  def _to_groups(self, t):
    """[B, H, W, E*D] -> [G, hr, wr, D]: heads by channel groups, then fold regions."""
    b, h, w, _ = t.shape
    t = clustering.fold(t.reshape(b, h, w, self.heads, self.head_dim), self.fold)
    t = t.transpose(0, 5, 1, 2, 3, 4, 6)  # [B, r, r, hr, wr, E, D] -> [B, E, r, r, hr, wr, D]
    return t.reshape(-1, *t.shape[4:])

  def _from_groups(self, t):
    """Inverse of `_to_groups`: [G, hr, wr, D] -> [B, H, W, E*D]."""
    r = self.fold
    _, hr, wr, d = t.shape
    t = t.reshape(-1, self.heads, r, r, hr, wr, d)  # [B, E, r, r, hr, wr, D]
    t = t.transpose(0, 2, 3, 4, 5, 1, 6)  # [B, r, r, hr, wr, E, D]
    t = clustering.unfold(t)  # [B, H, W, E, D]
    return t.reshape(*t.shape[:3], -1)


class ClusterPool(nn.Module):
  """Clustering-based feature pooling between stages: [B, H, W, C_in] -> [B, H/2, W/2, C_out].

  Centers are the 2x2 average of `conv_f` features (Eq. 4); each point joins its most similar
  center (Eq. 5's cosine, no heads), the representatives (Eq. 6 of `conv_v` values) form the
  output map, normalized and added to a strided 3x3 conv skip (Eq. 9; docs/official-code.md
  Sec. 3). Its fold is that of the stage the pool leads into (Sec. 2). `conv_f` only feeds the
  argmax, so in the official gradient semantics it receives no gradient at all (Sec. 4).
  """

  dim_out: int
  fold: int = 1
  aggregation: Aggregation = "auto"
  assign_grad: AssignGrad = "official"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C_in]
    b, h, w, dim = x.shape
    name = layer_name(self)
    clustering.check_divisible(name, (h, w), self.fold)
    r = self.fold
    hr, wr = h // r, w // r
    if hr % 2 or wr % 2:
      raise ValueError(
          f"{name}: ClusterPool needs an even feature map (per fold region), got "
          f"{hr}x{wr}; the official code fails here too. Use an input size whose map "
          f"at this layer is even (e.g. a multiple of 32 pixels)."
      )
    skip = nn.Conv(  # the residual of Eq. 9 ("ResConn"): a strided 3x3 conv, [B, H/2, W/2, C_out]
        self.dim_out,
        (3, 3),
        strides=2,
        padding=((1, 1), (1, 1)),
        dtype=self.dtype,
        kernel_init=torch_conv_kernel_init,
        bias_init=torch_conv_bias_init(9 * dim),  # fan_in: 3 x 3 x C_in
        name="conv_skip",
    )(x)
    value = clustering.fold(conv1x1(self.dim_out, dim, "conv_v", self.dtype)(x), r)
    feat = clustering.fold(conv1x1(self.dim_out, dim, "conv_f", self.dtype)(x), r)
    value = value.reshape(-1, hr, wr, self.dim_out)  # [G, hr, wr, D], G = B*r*r
    feat = feat.reshape(-1, hr, wr, self.dim_out)  # [G, hr, wr, D]
    # Eqs. 4-6 with Eq. 5's cosine as the similarity; centers: the 2x2 means, M = hr/2 * wr/2
    clustered = clustering.cluster(
        feat, value, (hr // 2, wr // 2), aggregation=self.aggregation, assign_grad=self.assign_grad
    )
    centers, assignment, reps = clustered.centers, clustered.assignment, clustered.representatives

    self.sow("intermediates", "assignment", self._output_index(assignment, b, hr, wr))
    self.sow(
        "intermediates",
        "centers",
        clustering.unfold(centers.reshape(b, r, r, hr // 2, wr // 2, -1)),  # [B, H/2, W/2, D]
    )
    reps = clustering.unfold(reps.reshape(b, r, r, hr // 2, wr // 2, -1)).astype(self.dtype)
    self.sow("intermediates", "representatives", reps)  # Eq. 6, [B, H/2, W/2, D], before norm2
    # Eq. 9, with the GroupNorm the paper leaves out (docs/official-code.md Sec. 3, ClusterPool)
    return skip + group_norm("norm2", self.dtype)(reps)

  def _output_index(self, assignment, b, hr, wr):
    """Region-local center index [G, N] -> row-major index into the stitched output map,
    [B, H, W]."""
    r, (oh, ow) = self.fold, (hr // 2, wr // 2)
    # each point's center: its row and col within the region, [B, r, r, hr, wr] each, then
    # shifted by the region's offset into the stitched [r*oh, r*ow] map
    i, j = jnp.divmod(assignment.reshape(b, r, r, hr, wr), ow)
    i = i + oh * jnp.arange(r, dtype=jnp.int32).reshape(1, r, 1, 1, 1)
    j = j + ow * jnp.arange(r, dtype=jnp.int32).reshape(1, 1, r, 1, 1)
    return clustering.unfold(i * (r * ow) + j)


class DropPath(nn.Module):
  """Stochastic depth per sample (timm semantics): drop whole samples, rescale survivors by 1/keep
  (docs/official-code.md Sec. 3, ClusterBlock).

  The rate is a call argument, not an attribute, so that it can be an input scanned over a stage's
  blocks (see `FEC`); a rate of 0 keeps every sample and leaves x unchanged.
  """

  @nn.compact
  def __call__(self, x, rate):
    keep = 1.0 - jnp.asarray(rate, clustering.at_least_f32(x).dtype)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * mask.astype(x.dtype) / keep.astype(x.dtype)


class ClusterBlock(nn.Module):
  """x + drop_path(ls1 * Cluster(GN(x))), then x + drop_path(ls2 * Mlp(GN(x)))
  (docs/official-code.md Sec. 3).

  `stochastic_depth=False` skips drop path (evaluation, or a drop path rate of 0).
  """

  mlp_ratio: int
  heads: int
  head_dim: int
  centers: tuple[int, int]
  fold: int = 1
  layer_scale_init: float = 1e-5
  stochastic_depth: bool = False
  aggregation: Aggregation = "auto"
  assign_grad: AssignGrad = "official"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, drop_path=0.0):  # x [B, H, W, C]; drop_path: this block's rate
    dim = x.shape[-1]
    ls1 = self.param("layer_scale_1", nn.initializers.constant(self.layer_scale_init), (dim,))
    ls2 = self.param("layer_scale_2", nn.initializers.constant(self.layer_scale_init), (dim,))
    mixer = Cluster(
        self.heads,
        self.head_dim,
        self.centers,
        self.fold,
        self.aggregation,
        self.assign_grad,
        self.dtype,
        name="token_mixer",
    )
    drop = DropPath() if self.stochastic_depth else lambda y, _: y
    y = mixer(group_norm("norm1", self.dtype)(x))
    x = x + drop(ls1.astype(y.dtype) * y, drop_path)
    y = Mlp(self.mlp_ratio * dim, self.dtype, name="mlp")(group_norm("norm2", self.dtype)(x))
    return x + drop(ls2.astype(y.dtype) * y, drop_path)


def _stage_step(block: ClusterBlock, x, drop_path):
  """One iteration of a stage's scan: (carry, scanned input) -> (carry, no output)."""
  return block(x, drop_path), None


# A stage's blocks have identical shapes, so they run as one nn.scan: one compiled block per stage
# instead of depth unrolled copies (the TPU train step of fec_small compiles in 0.65x the time,
# 141.5 s against 217.3 s; README, Performance). The scan stacks the blocks' params (and sown
# assignments) on a leading block axis: flax `network_0/token_mixer/f/kernel` [depth, ...] holds
# torch `network.0.{j}.token_mixer.f.weight` for every block j (`torch_module_path`).
# Under a scan, the backward pass keeps every residual of every block that JAX saves by default
# (on TPU, 2.1x the unrolled program's memory: XLA cannot fuse recomputation across the loop), so
# each block is rematerialized keeping only the outputs of its matmuls without batch dimensions
# (the convolutions and dense layers): 0.75x the unrolled program's memory, no slower on CPU.
# `unroll=True` gives the same computation and params as straight-line code: XLA's cost analysis
# counts a loop body once, unrolled it counts every block.
def _stage_scan(unroll: bool):
  return nn.scan(
      nn.remat(
          _stage_step,
          policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
          prevent_cse=False,  # the scan already keeps the recomputation apart (JAX docs)
      ),
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True},
      unroll=True if unroll else 1,
  )


STAGE_NAME = re.compile(r"network_(\d*[02468])")  # stage s is network_{2s}; pools are odd


def is_stage(module: str) -> bool:
  """Whether a flax module name is a scanned stage, whose variables have a leading block axis."""
  return STAGE_NAME.fullmatch(module) is not None


def block_axis(flax_path: Sequence[str]) -> bool:
  """Whether a variable at this flax path (within a model, a backbone, ...) is stacked per block."""
  return any(is_stage(name) for name in flax_path[:-1])


def coordinate_channels(b: int, h: int, w: int) -> jnp.ndarray:
  """The two position channels appended to the image: i/(H-1) - 0.5 and j/(W-1) - 0.5,
  [B, H, W, 2] (docs/official-code.md Sec. 3, Input embedding; not in the paper)."""
  # Host-side numpy: IEEE division like torch's (XLA may turn x / c into x * (1 / c), 1 ulp off).
  rows = np.arange(h, dtype=np.float32) / np.float32(h - 1) - np.float32(0.5)
  cols = np.arange(w, dtype=np.float32) / np.float32(w - 1) - np.float32(0.5)
  grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)
  return jnp.broadcast_to(grid, (b, h, w, 2))


class PatchEmbed(nn.Module):
  """4x4 stride-4 convolution over the image and its two coordinate channels
  (docs/official-code.md Sec. 3, Input embedding)."""

  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):  # [B, H, W, 3] -> [B, H/4, W/4, C0]
    b, h, w, _ = images.shape
    images = clustering.at_least_f32(images)
    x = jnp.concatenate([images, coordinate_channels(b, h, w).astype(images.dtype)], axis=-1)
    return nn.Conv(
        self.dim,
        (4, 4),
        strides=4,
        padding="VALID",
        dtype=self.dtype,
        kernel_init=torch_conv_kernel_init,
        bias_init=torch_conv_bias_init(5 * 16),  # fan_in: 5 channels x 4 x 4
        name="proj",
    )(x)


class FEC(nn.Module):
  """The FEC backbone. Takes NHWC images normalized with the ImageNet mean/std.

  Returns logits [B, num_classes], or for dense variants the four normalized stage maps
  (strides 4, 8, 16, 32, NHWC). `unroll_stages` unrolls each stage's scan of its blocks (same
  params and results; for XLA's cost analysis, which counts a loop body once).
  """

  variant: Variant
  num_classes: int = 1000
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-5
  aggregation: Aggregation = "auto"
  assign_grad: AssignGrad = "official"
  unroll_stages: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    _check_images(images)
    v = self.variant
    total = sum(v.depths)
    common = dict(aggregation=self.aggregation, assign_grad=self.assign_grad, dtype=self.dtype)
    x = PatchEmbed(v.dims[0], self.dtype, name="patch_embed")(images)
    # stochastic depth, rising per block (docs/official-code.md Sec. 3, ClusterBlock)
    rates = np.linspace(0.0, self.drop_path_rate, total)
    scan = _stage_scan(self.unroll_stages)
    features = []
    for s, depth in enumerate(v.depths):
      if s > 0:  # network.{2s-1}: with the fold of the stage it leads into, as the official
        # constructor's fold_w[i + 1] (docs/official-code.md Sec. 2)
        x = ClusterPool(v.dims[s], v.folds[s], name=f"network_{2 * s - 1}", **common)(x)
      block = ClusterBlock(
          v.mlp_ratios[s],
          v.heads[s],
          v.head_dim,
          v.centers[s],
          v.folds[s],
          self.layer_scale_init,
          stochastic_depth=train and self.drop_path_rate > 0,
          name=f"network_{2 * s}",
          **common,
      )
      first = sum(v.depths[:s])
      x, _ = scan(block, x, jnp.asarray(rates[first : first + depth], jnp.float32))
      if v.dense_outputs:  # docs/official-code.md Sec. 6
        features.append(clustering.at_least_f32(group_norm(f"norm{2 * s}", self.dtype)(x)))
    if v.dense_outputs:
      return features
    # docs/official-code.md Sec. 3, Head: the mean over H, W of GroupNorm(x), then the linear
    # head; [B, num_classes]
    x = clustering.at_least_f32(group_norm("norm", self.dtype)(x)).mean(axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=linear_kernel_init, name="head")(x)


def _check_images(images) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    hint = (
        " (this looks like NCHW: transpose to NHWC)"
        if images.ndim == 4 and images.shape[1] == 3
        else ""
    )
    raise ValueError(f"FEC expects NHWC images [B, H, W, 3], got shape {tuple(images.shape)}{hint}")
  if not jnp.issubdtype(images.dtype, jnp.floating):  # uint8 pixels would run as 0..255
    raise ValueError(
        f"FEC expects float images normalized with the ImageNet mean/std, got {images.dtype}: "
        "fec_jax.data.device_transforms.normalize(images, mean, std) takes uint8 images, with "
        "fec_jax.data.transforms.IMAGENET_MEAN and IMAGENET_STD"
    )


def sown_by_fec(state) -> dict[str, Any]:
  """What the FEC sowed, from `model.apply(v, x, mutable=["intermediates"])[1]` or its
  "intermediates" collection; of a Semantic FPN segmenter, what its backbone sowed (under the
  backbone's module name)."""
  sown = state.get("intermediates", state)
  return sown.get("backbone", sown)


def cluster_assignments(intermediates) -> dict[str, jnp.ndarray]:
  """Sown assignments in forward order, keyed by the official module name (e.g. 'network.1',
  'network.0.2.token_mixer'): a stage's stacked assignments are split into its blocks.

  `intermediates` is the state from `model.apply(v, x, mutable=["intermediates"])[1]` or its
  "intermediates" collection; of a Semantic FPN segmenter, these are its backbone's assignments.
  Anything else (the variables, apply's whole (output, state) tuple) is a TypeError or
  ValueError saying what to give, not an empty dict.
  """
  expected = 'the state of model.apply(v, x, mutable=["intermediates"]) (its [1])'
  if not isinstance(intermediates, Mapping):
    raise TypeError(f"cluster_assignments takes {expected}, got a {type(intermediates).__name__}")
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(
      sown_by_fec(intermediates), is_leaf=lambda t: isinstance(t, tuple)
  )[0]:
    keys = [p.key for p in path]
    if keys[-1] != "assignment":
      continue
    if block_axis(keys):
      for j in range(value[0].shape[0]):
        out[".".join(torch_module_path(keys[:-1], j))] = value[0][j]
    else:
      out[".".join(torch_module_path(keys[:-1]))] = value[0]
  if not out:
    raise ValueError(
        f"cluster_assignments found no assignment in a dict of {sorted(intermediates)}; "
        f"expected {expected} or its 'intermediates' collection"
    )
  return dict(sorted(out.items(), key=lambda kv: _forward_order(kv[0])))


def torch_module_path(flax_path: Sequence[str], block: int | str | None = None) -> list[str]:
  """The official module path of a flax one. A stage's path takes the block index of its scan:
  ('network_0', 'token_mixer'), block 2 -> ['network', '0', '2', 'token_mixer'];
  ('network_1', 'conv_f') -> ['network', '1', 'conv_f'];
  ('decode_head', 'scale_heads_3_2') -> ['decode_head', 'scale_heads', '3', '2']."""
  out = []
  for name in flax_path:
    out += re.sub(r"_(\d+)(?=_|$)", r".\1", name).split(".")
    if is_stage(name):
      if block is None:
        raise ValueError(f"{'/'.join(flax_path)} is a stage of stacked blocks: give the block")
      out.append(str(block))
  return out


def _forward_order(name: str) -> tuple[int, int]:
  parts = name.split(".")
  return int(parts[1]), int(parts[2]) if len(parts) > 2 else -1


def variant_name(variant: Variant) -> str:
  return next(name for name, v in VARIANTS.items() if v == variant)


def model_name(model: nn.Module) -> str:
  """The `create_model` name of a model it built: 'fec_small', 'fpn_fec_small', ..."""
  name = variant_name(model.variant)
  return name if isinstance(model, FEC) else next(s for s, b in SEGMENTERS.items() if b == name)


def variable_shapes(model: nn.Module) -> dict[str, Any]:
  """The model's variables ({"params"}, and "batch_stats" for segmenters) as ShapeDtypeStructs,
  computed without running anything; each call gets dicts of its own."""
  try:
    hash(model)
  except TypeError:  # a module built with a list among its fields: traced every time
    return _traced_variable_shapes.__wrapped__(model)
  return jax.tree.map(lambda shape: shape, _traced_variable_shapes(model))


# Tracing init takes 0.5 to 1 s on a CPU, and one command can need a model's shapes several times
# (a conversion checks them in torch_to_variables and again in save_params): traced once per model.
@functools.lru_cache(maxsize=8)
def _traced_variable_shapes(model: nn.Module) -> dict[str, Any]:
  # Any valid size: the variables' shapes do not depend on it.
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


def param_shapes(model: nn.Module) -> dict[str, Any]:
  """The model's params as ShapeDtypeStructs, computed without running anything."""
  return variable_shapes(model)["params"]


def count_params(params) -> int:
  """The number of parameters in a params tree (arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


# Compiler options for programs that run once (init): without XLA's backend optimizations, the
# CPU compile is about 4x faster and the run no slower that matters.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def init_variables(model: nn.Module, rng, image_shape=(1, 224, 224, 3)) -> dict[str, Any]:
  """`model.init` for images of `image_shape`, compiled without XLA's backend optimizations.

  Init runs once, and its fully optimized CPU compile takes about 4x longer (e.g. 50 s vs 13 s for
  fec_small on 2 cores) for no gain.
  """
  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  init = jax.jit(model.init).lower(rng, images).compile(compiler_options=FAST_COMPILE)
  return init(rng, jnp.zeros(image_shape, jnp.float32))


def list_models() -> list[str]:
  return sorted([*VARIANTS, *SEGMENTERS])


def classifiers() -> list[str]:
  """The variants with a classification head (not the seg/det backbones, not the segmenters)."""
  return sorted(n for n, v in VARIANTS.items() if not v.dense_outputs)


def is_classifier(model: nn.Module) -> bool:
  """Whether `model` gives class logits: an FEC of a variant with a classification head."""
  return isinstance(model, FEC) and not model.variant.dense_outputs


def init_from_models(name: str) -> tuple[str, ...]:
  """The models whose weights can start a run of `name` (config.init_from; the tasks'
  adopt_pretrained): a segmenter starts from its backbone's ImageNet classifier, that dense
  backbone or a segmenter of its own kind; a classifier from a classifier of its own kind."""
  if name in SEGMENTERS:
    backbone = SEGMENTERS[name]
    return backbone.removesuffix("_seg"), backbone, name
  return (name,)


def create_model(name: str, **overrides) -> nn.Module:
  """`create_model('fec_small', num_classes=10, drop_path_rate=0.1, dtype=jnp.bfloat16)`;
  `create_model('fpn_fec_small')` gives a fec_jax.fpn.SemanticFPN (150 classes by default)."""
  if name in SEGMENTERS:
    from fec_jax.fpn import SemanticFPN  # fpn builds on this module

    cls, variant = SemanticFPN, VARIANTS[SEGMENTERS[name]]
  elif name in VARIANTS:
    cls, variant = FEC, VARIANTS[name]
  else:
    raise ValueError(
        f"unknown model {name!r}; available: {', '.join(list_models())}"
        + reporting.did_you_mean([name], list_models())
    )
  fields = {f.name for f in dataclasses.fields(cls)} - {"variant", "parent", "name"}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(
        f"{reporting.counted(len(unknown), 'unknown option')} {sorted(unknown)} for {name}; "
        f"accepted: {sorted(fields)}{reporting.did_you_mean(sorted(unknown), sorted(fields))}"
    )
  hints = typing.get_type_hints(cls)
  for key, value in overrides.items():  # the choices (aggregation, assign_grad), checked now
    choices = typing.get_args(hints[key]) if typing.get_origin(hints[key]) is Literal else None
    if choices and value not in choices:
      raise ValueError(f"{key} must be one of {choices}, got {value!r}")
  if "dtype" in overrides and not _is_float_dtype(overrides["dtype"]):  # else a numpy error at init
    raise ValueError(
        f"dtype must be a float dtype (jnp.bfloat16, 'float32', ...), got {overrides['dtype']!r}"
    )
  return cls(variant, **overrides)


def _is_float_dtype(dtype) -> bool:
  try:
    return jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:  # not a dtype: 'bf16'
    return False
