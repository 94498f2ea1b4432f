"""Cluster interpretability (fec_jax/interpret.py, visualize.py) against a plain NumPy rendition of
the official visualization algorithm (docs/official-code.md Sec. 9): Python dicts of member
blocks linked pool by pool, empty clusters dropped, K-Means on the last pool's centers.

Weights are random: the linking math does not need trained ones. They are drawn in NumPy on the
shapes of `jax.eval_shape(model.init)` (tracing only), and the model runs eagerly, which keeps
this module to seconds instead of compiling fec_small.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.datasets import load_sample_image

from fec_jax import cluster_assignments, create_model, interpret, visualize
from fec_jax.checkpoint import save_params
from fec_jax.data.device_transforms import normalize
from fec_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fec_jax.model import FEC, Variant


def random_variables(model, shape, seed=0):
  """Random weights at a sane scale: kernels N(0, 1/fan_in), scales ~1, biases ~0.1."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if leaf.ndim >= 2:
      return rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    base = 1.0 if name in ("scale", "layer_scale_1", "layer_scale_2", "sim_alpha") else 0.0
    return (base + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def sample_images(size):
  """scikit-learn's two sample photos resized to (H, W), ImageNet-normalized: [2, H, W, 3]."""
  photos = [
      Image.fromarray(load_sample_image(n)).resize(size[::-1], Image.Resampling.BICUBIC)
      for n in ("china.jpg", "flower.jpg")
  ]
  return np.asarray(
      normalize(np.stack([np.asarray(p) for p in photos]), IMAGENET_MEAN, IMAGENET_STD)
  )


# ---------------------------------------------------------------------------------------------
# The official algorithm, one image at a time, with dicts (docs/official-code.md Sec. 9)
# ---------------------------------------------------------------------------------------------
def official_members(pool_assignments):
  """[{cluster: [blocks]}] per level: level 0 = each block alone; a pool's cluster is the union of
  the members of every previous cluster assigned to it (Eq. 8); empty clusters never appear."""
  h, w = pool_assignments[0].shape
  members = {p: [p] for p in range(h * w)}
  levels = [members]
  for assignment in pool_assignments:
    merged = {}
    for point, center in enumerate(assignment.reshape(-1).tolist()):
      if members.get(point):
        merged.setdefault(center, []).extend(members[point])
    members = merged
    levels.append(members)
  return levels


def to_map(members, grid, scale):
  """{label: [blocks]} -> [H, W] label map of the block grid, upsampled nearest by `scale`."""
  out = np.full(grid[0] * grid[1], -1)
  for label, blocks in members.items():
    out[blocks] = label
  return out.reshape(grid).repeat(scale, 0).repeat(scale, 1)


def official_groups(final, features, k):
  """K-Means over the non-empty final clusters (ascending), each cluster's blocks get its group."""
  ids = sorted(final)
  groups = KMeans(min(k, len(ids)), random_state=0, n_init="auto").fit_predict(features[ids])
  members = {}
  for c, g in zip(ids, groups):
    members.setdefault(int(g), []).extend(final[c])
  return members


def numpy_last_pool(x, params):
  """The last ClusterPool's centers, assignment and representatives from its input x [h, w, C]."""
  h, w, _ = x.shape
  feat = x @ params["conv_f"]["kernel"] + params["conv_f"]["bias"]
  value = x @ params["conv_v"]["kernel"] + params["conv_v"]["bias"]
  pool = lambda t: t.reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3)).reshape(h * w // 4, -1)
  centers, value_centers = pool(feat), pool(value)
  unit = lambda t: t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
  assignment = np.argmax(unit(centers) @ unit(feat.reshape(h * w, -1)).T, axis=0)
  reps = value_centers.copy()
  counts = np.ones(len(reps))
  for point, m in enumerate(assignment):
    reps[m] += value.reshape(h * w, -1)[point]
    counts[m] += 1
  return centers, assignment.reshape(h, w), reps / counts[:, None]


@functools.partial(jax.jit, static_argnums=(0, 3))
def forward(model, variables, images, capture):
  """(cluster_maps with encodings, sown state plus the output of layer `capture`): one compile."""
  clusters = interpret.cluster_maps(model, variables, images, encodings=True)
  _, state = model.apply(
      variables,
      images,
      mutable=["intermediates"],
      capture_intermediates=lambda mdl, _: mdl.name == capture,
  )
  return clusters, state


# ---------------------------------------------------------------------------------------------
# fec_small at 224x224
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
  model = create_model("fec_small")
  images = sample_images((224, 224))
  variables = random_variables(model, images.shape)
  return (model, variables, *forward(model, variables, images, "network_4"))


def test_cluster_assignments_still_only_assignments(small):
  _, _, _, state = small
  names = list(cluster_assignments(state))
  assert names[:4] == [f"network.0.{j}.token_mixer" for j in range(3)] + ["network.1"]
  assert len(names) == 3 + 14  # 3 pools + 14 blocks; no 'centers' or 'representatives'


def test_last_pool_features_match_numpy(small):
  model, variables, clusters, state = small
  x = np.asarray(state["intermediates"]["network_4"]["__call__"][0][-1], np.float64)  # last block
  pool = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"]["network_5"])
  assert clusters.centers.shape == clusters.representatives.shape == (2, 7, 7, 320)
  for b in range(2):
    centers, assignment, reps = numpy_last_pool(x[b], pool)
    np.testing.assert_array_equal(cluster_assignments(state)["network.5"][b], assignment)
    np.testing.assert_allclose(clusters.centers[b].reshape(49, -1), centers, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        clusters.representatives[b].reshape(49, -1), reps, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("feature", ["centers", "representatives"])
def test_label_maps_equal_official_algorithm(small, feature):
  model, _, clusters, state = small
  sown = cluster_assignments(state)
  pools = [np.asarray(sown[n]) for n in ("network.1", "network.3", "network.5")]
  assert interpret.level_names(model) == ("blocks", "network.1", "network.3", "network.5")
  assert clusters.levels.shape == (2, 4, 224, 224)
  grouped = interpret.group_batch(clusters, 3, feature)
  for b in range(2):
    levels = official_members([p[b] for p in pools])
    for level, members in enumerate(levels):
      np.testing.assert_array_equal(clusters.levels[b, level], to_map(members, (56, 56), 4))
    features = np.asarray(getattr(clusters, feature)[b], np.float32).reshape(49, -1)
    expected = to_map(official_groups(levels[-1], features, 3), (56, 56), 4)
    np.testing.assert_array_equal(grouped[b], expected)
    assert len(np.unique(grouped[b])) == 3
    assert len(levels[-1]) < 49  # some final clusters are empty: the dropping is exercised


def test_encoding_clusters_follow_their_level(small):
  model, _, clusters, state = small
  sown = cluster_assignments(state)
  assert interpret.encoding_names(model) == tuple(clusters.encodings)  # forward order
  assert len(clusters.encodings) == 14
  pools = [np.asarray(sown[n]) for n in ("network.1", "network.3", "network.5")]
  for b in range(2):
    levels = official_members([p[b] for p in pools])
    for name, got in clusters.encodings.items():
      stage = int(name.split(".")[1]) // 2
      heads = sown[name].shape[1]
      assert got.shape == (2, heads, 224, 224)
      for e in range(heads):
        flat = np.asarray(sown[name][b, e]).reshape(-1)
        expected = {int(flat[c]): [] for c in levels[stage]}
        for c, blocks in levels[stage].items():
          expected[int(flat[c])] += blocks
        np.testing.assert_array_equal(got[b, e], to_map(expected, (56, 56), 4), err_msg=name)


# ---------------------------------------------------------------------------------------------
# Any resolution and fold: a tiny variant, non-square input, fold 2 in the first two pools
# ---------------------------------------------------------------------------------------------
def test_non_square_input_with_folds():
  model = FEC(
      Variant(
          depths=(1, 1, 1, 1),
          dims=(8, 16, 16, 16),
          heads=(1, 1, 2, 2),
          head_dim=4,
          folds=(2, 2, 1, 1),
      ),
      num_classes=10,
  )
  images = sample_images((64, 96))
  clusters, state = forward(model, random_variables(model, images.shape, 1), images, "")
  sown = cluster_assignments(state)
  pools = [np.asarray(sown[n]) for n in ("network.1", "network.3", "network.5")]
  assert clusters.levels.shape == (2, 4, 64, 96)
  assert clusters.centers.shape == (2, 2, 3, 16)
  for b in range(2):
    for level, members in enumerate(official_members([p[b] for p in pools])):
      np.testing.assert_array_equal(clusters.levels[b, level], to_map(members, (16, 24), 4))
  # a fold-2 pool clusters each quadrant on its own: a block's level-1 center is in its quadrant
  level1 = np.asarray(clusters.levels[:, 1, ::4, ::4])  # [2, 16, 24], index into the 8x12 map
  rows, cols = np.divmod(level1, 12)
  quadrant_rows = np.broadcast_to((np.arange(16) // 8)[:, None], rows.shape)
  np.testing.assert_array_equal(rows // 4, quadrant_rows)
  np.testing.assert_array_equal(cols // 6, np.broadcast_to(np.arange(24) // 12, cols.shape))


def test_a_segmenters_clusters_are_its_backbones():
  """cluster_maps on a Semantic FPN: the clusters of its FEC backbone, as the dense backbone
  model gives them from the same weights."""
  segmenter = create_model("fpn_fec_small")
  images = sample_images((64, 64))
  variables = random_variables(segmenter, images.shape, 2)
  got = interpret.cluster_maps(segmenter, variables, images)
  backbone = create_model("fec_small_seg")
  expected = interpret.cluster_maps(backbone, {"params": variables["params"]["backbone"]}, images)
  assert got.levels.shape == (2, 4, 64, 64) and len(np.unique(got.levels[:, 1])) > 1
  np.testing.assert_array_equal(got.levels, expected.levels)
  np.testing.assert_array_equal(got.representatives, expected.representatives)
  assert interpret.level_names(segmenter) == ("blocks", "network.1", "network.3", "network.5")


def test_link_is_a_chain_of_gathers():
  a1 = np.array([[[0, 0, 1, 1], [2, 3, 3, 3]]])  # [1, 2, 4] -> index into a 1x4 map
  a2 = np.array([[[1, 1, 0, 1]]])  # [1, 1, 4] -> index into a 1x2 map
  levels = np.asarray(interpret.link([jnp.asarray(a1), jnp.asarray(a2)]))
  np.testing.assert_array_equal(levels[0, 0], np.arange(8).reshape(2, 4))
  np.testing.assert_array_equal(levels[0, 1], a1[0])
  np.testing.assert_array_equal(levels[0, 2], [[1, 1, 1, 1], [0, 1, 1, 1]])


def test_group_clusters_drops_empty_clusters():
  final = np.array([[2, 2, 5], [7, 7, 5]])
  features = np.zeros((9, 2))
  features[[2, 5, 7]] = [[0, 0], [0, 0.1], [5, 5]]
  features[[0, 1, 3, 4, 6, 8]] = 100  # empty: would grab a K-Means center if not dropped
  groups = interpret.group_clusters(final, features, 2)
  assert groups[0, 0] == groups[0, 2] != groups[1, 0]
  assert interpret.group_clusters(final, features, 5).max() == 2  # at most the 3 non-empty ones
  with pytest.raises(ValueError, match="feature"):
    interpret.group_batch(interpret.Clusters(None, None, None, None, {}), 3, "values")
  with pytest.raises(ValueError, match="num_clusters must be at least 1, got 0"):
    interpret.group_clusters(final, features, 0)  # not scikit-learn's InvalidParameterError


# ---------------------------------------------------------------------------------------------
# The command, on a checkpoint written like the converter's
# ---------------------------------------------------------------------------------------------
def test_visualize_command(tmp_path, capsys):
  model = create_model("fec_small")
  save_params(
      str(tmp_path / "ckpt"),
      random_variables(model, (1, 64, 64, 3))["params"],
      "fec_small",
      {"num_classes": 1000},
  )
  paths = []
  for i, name in enumerate(["china.jpg", "flower.jpg", "china.jpg"]):
    paths.append(tmp_path / f"{i}" / name)
    paths[-1].parent.mkdir()
    Image.fromarray(load_sample_image(name)).save(paths[-1])
  out = tmp_path / "vis"
  assert (
      visualize.main(
          [
              "--checkpoint",
              str(tmp_path / "ckpt"),
              "--image",
              *map(str, paths),
              "--num-clusters",
              "3",
              "5",
              "--image-size",
              "64",
              "--batch-size",
              "2",
              "--median-filter",
              "3",
              "--out",
              str(out),
          ]
      )
      == 0
  )
  assert sorted(p.name for p in out.iterdir()) == sorted(
      f"{s}_{t}.png" for s in ("china", "flower", "china_1") for t in ("k3", "k5", "levels")
  )
  with Image.open(out / "china_k3.png") as overlay:
    assert overlay.size == (640, 427)  # the image's own size
  with Image.open(out / "china_levels.png") as strip:
    assert strip.size[0] == 6 * (192 + 4) - 4  # input, 3 levels, 2 groupings; 64 px zoomed x3
  captured = capsys.readouterr()
  printed = captured.out.splitlines()
  assert len(printed) == 4
  assert f"note: {paths[2]} is written as china_1_*.png (another --image has its name)\n" in (
      captured.err
  )
  assert re.fullmatch(r".*china\.jpg: .+ \(\d+\.\d%\)", printed[0])
