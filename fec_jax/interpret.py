"""Cluster interpretability (paper Sec. 5.2): FEC's growing clusters as label maps.

One forward pass sows every layer's hard *assignment* (fec_jax/model.py). The patch embedding
turns the image into a grid of 4x4-pixel blocks; the ClusterPool layers (network.1, .3, .5) then
assign those blocks, and in turn the previous clusters, to ever fewer *centers*. Linking the
assignments across the pools (Eq. 8) gives a hierarchy of segments:

  level 0   every block is its own cluster
  level l   the cluster of pool l, i.e. a row-major index into pool l's output map

Everything here is gathers over [B, ...] arrays (no per-cluster Python), for any batch, input
size and fold setting; only the optional K-Means grouping (`group_clusters`) runs per image in
scikit-learn, as the paper does.
"""

from __future__ import annotations

import typing
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans

from fec_jax.model import cluster_assignments, sown_by_fec

Feature = Literal["centers", "representatives"]
FEATURES = typing.get_args(Feature)


class Clusters(NamedTuple):
  """What one forward pass reveals; H, W is the input image size.

  outputs: the model's logits [B, num_classes] (the dense variants' feature maps, a Semantic FPN
    segmenter's logits [B, H/4, W/4, num_classes])
  levels: [B, L+1, H, W] int32, level 0 = the 4x4-pixel blocks, level l = pool l's clusters (Eq. 8)
  centers: [B, h, w, D] the last pool's centers in similarity space (2x2 means of `conv_f`)
  representatives: [B, h, w, D] the last pool's representatives R (Eq. 6 of `conv_v` values)
  encodings: {'network.{2s}.{j}.token_mixer': [B, heads, H, W]} the clusters of each encoding
    layer (block j of stage s) linked to pixels like the levels, or {} when not asked for
  """

  outputs: jax.Array | list[jax.Array]
  levels: jax.Array
  centers: jax.Array
  representatives: jax.Array
  encodings: dict[str, jax.Array]


def level_names(model: nn.Module) -> tuple[str, ...]:
  """The layer behind each level: ('blocks', 'network.1', 'network.3', 'network.5')."""
  return ("blocks", *(f"network.{2 * s - 1}" for s in range(1, len(model.variant.depths))))


def encoding_names(model: nn.Module) -> tuple[str, ...]:
  """The encoding (Cluster) layers, in forward order, as `Clusters.encodings` names them:
  ('network.0.0.token_mixer', ..., 'network.6.1.token_mixer'), stage s's blocks under network.2s."""
  return tuple(
      f"network.{2 * s}.{j}.token_mixer"
      for s, depth in enumerate(model.variant.depths)
      for j in range(depth)
  )


def encoding_stage(name: str) -> int:
  """The stage s of an encoding layer named as encoding_names names it (network.{2s}.{j}...)."""
  return int(name.split(".")[1]) // 2


def link(pool_assignments: list[jax.Array]) -> jax.Array:
  """Eq. 8: S^l_h = Union{S^(l-1)_o | A^l_oh = 1}, as a chain of gathers.

  pool_assignments: pool l's assignment [B, H_l, W_l] over its input grid, each an index into its
  output grid (= the next pool's input grid). Returns [B, L+1, H_1, W_1] int32: for every block of
  the first pool's input grid, its cluster at every level.
  """
  b, h, w = pool_assignments[0].shape
  labels = jnp.broadcast_to(jnp.arange(h * w, dtype=jnp.int32), (b, h * w))
  levels = [labels]
  for assignment in pool_assignments:  # Eq. 8: each point follows its cluster to the next level
    labels = jnp.take_along_axis(assignment.reshape(b, -1), labels, axis=1)  # [B, H*W]
    levels.append(labels)
  return jnp.stack(levels, axis=1).reshape(b, -1, h, w)  # [B, L+1, H_1, W_1]


def link_encoding(assignment: jax.Array, level: jax.Array) -> jax.Array:
  """Clusters of an encoding layer seen from the blocks.

  assignment [B, heads, h, w] of a Cluster layer whose input grid is the output grid of `level`'s
  pool; level [B, H_1, W_1], the blocks' clusters at that level. Returns [B, heads, H_1, W_1].
  """
  b, e = assignment.shape[:2]
  # [B, heads, H_1 * W_1]: each block takes the assignment of its cluster (a point of the layer)
  flat = jnp.take_along_axis(assignment.reshape(b, e, -1), level.reshape(b, 1, -1), axis=2)
  return flat.reshape(b, e, *level.shape[1:])


def resize_nearest(labels: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest upsampling of label maps [..., h, w] -> [..., H, W] (source index floor(i * h / H))."""
  h, w = labels.shape[-2:]
  rows = jnp.arange(size[0]) * h // size[0]
  cols = jnp.arange(size[1]) * w // size[1]
  return jnp.asarray(labels)[..., rows[:, None], cols[None, :]]


def cluster_maps(
    model: nn.Module, variables, images: jax.Array, encodings: bool = False
) -> Clusters:
  """Runs `model` once on NHWC normalized images [B, H, W, 3] and links its clusters to pixels
  (docs/official-code.md Sec. 9, steps 1-2).
  `model`: an FEC (classifier or dense backbone), or a Semantic FPN segmenter, whose backbone's
  clusters these are (its outputs: the segmenter's logits).

  Jit it with the model static: `jax.jit(cluster_maps, static_argnums=(0, 3))`.
  """
  outputs, state = model.apply(variables, images, mutable=["intermediates"])
  state = sown_by_fec(state)
  assignments = cluster_assignments(state)
  pools = [name for name in assignments if name.count(".") == 1]  # 'network.1', ...
  levels = link([assignments[name] for name in pools])
  size = images.shape[1:3]
  mixers = {}
  if encodings:  # stage s's blocks see the clusters of level s (its input map is pool s's output)
    mixers = {
        name: resize_nearest(link_encoding(a, levels[:, encoding_stage(name)]), size)
        for name, a in assignments.items()
        if name.count(".") == 3
    }
  last = state[pools[-1].replace(".", "_")]  # its flax name: network.5 -> network_5
  return Clusters(
      outputs, resize_nearest(levels, size), last["centers"][0], last["representatives"][0], mixers
  )


def group_clusters(final: np.ndarray, features: np.ndarray, num_clusters: int) -> np.ndarray:
  """K-Means grouping of the final clusters of one image (paper Sec. 5.2,
  docs/official-code.md Sec. 9).

  final [H, W] int: cluster index into features [M, D] (the last level). Empty clusters are dropped,
  the others grouped by scikit-learn KMeans (random_state=0, n_init="auto") in ascending cluster
  order, on float32 features as the official script's (KMeans computes in their dtype).
  Returns [H, W] int32 groups in [0, min(num_clusters, non-empty clusters)).
  """
  if num_clusters < 1:
    raise ValueError(f"num_clusters must be at least 1, got {num_clusters}")
  present = np.unique(final)
  kmeans = KMeans(min(num_clusters, len(present)), random_state=0, n_init="auto")
  groups = kmeans.fit_predict(np.asarray(features, np.float32)[present])
  return groups[np.searchsorted(present, final)].astype(np.int32)


def group_batch(clusters: Clusters, num_clusters: int, feature: Feature = "centers") -> np.ndarray:
  """`group_clusters` for every image: [B, H, W] int32.

  feature: 'centers' (the official script) or 'representatives' (R in the paper's text).
  """
  if feature not in FEATURES:
    raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
  features = np.asarray(getattr(clusters, feature))
  features = features.reshape(features.shape[0], -1, features.shape[-1])  # [B, M, D]
  final = np.asarray(clusters.levels[:, -1])
  return np.stack([group_clusters(f, x, num_clusters) for f, x in zip(final, features)])
