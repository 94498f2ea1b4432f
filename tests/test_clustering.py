"""The clustering ops: PyTorch-exact adaptive pooling, the aggregation paths and their
per-platform dispatch, straight-through."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fec_jax import clustering

SIZES = [1, 2, 3, 5, 7, 8, 13, 14, 28]


@pytest.mark.parametrize("in_h,out_h", [(i, o) for i, o in itertools.product(SIZES, SIZES)])
def test_adaptive_avg_pool_matches_torch(in_h, out_h):
  """Every pair of sizes, overlapping windows and outputs larger than inputs included."""
  in_w, out_w = in_h + 3, max(1, out_h - 1)  # non-square too
  x = np.random.default_rng(in_h * 100 + out_h).normal(size=(2, in_h, in_w, 5)).astype(np.float32)
  expected = (
      torch.nn.functional.adaptive_avg_pool2d(
          torch.from_numpy(x).permute(0, 3, 1, 2), (out_h, out_w)
      )
      .permute(0, 2, 3, 1)
      .numpy()
  )
  got = np.asarray(clustering.adaptive_avg_pool(jnp.asarray(x), (out_h, out_w)))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_adaptive_window_matrix_overlaps_like_torch():
  # 7 -> 2 gives windows [0, 4) and [3, 7) (docs/official-code.md Sec. 3)
  np.testing.assert_array_equal(
      clustering.adaptive_window_matrix(7, 2), [[1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]]
  )


def test_fold_unfold_roundtrip_and_region_order():
  x = jnp.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3)
  folded = clustering.fold(x, 2)  # [B, r1, r2, 2, 3, C]
  assert folded.shape == (2, 2, 2, 2, 3, 3)
  np.testing.assert_array_equal(folded[:, 0, 1], x[:, :2, 3:])  # region r1=0, r2=1: top right
  np.testing.assert_array_equal(clustering.unfold(folded), x)


def _random_cluster_inputs(seed, g=3, n=20, m=6, d=4):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  values = jax.random.normal(k[0], (g, n, d))
  value_centers = jax.random.normal(k[1], (g, m, d))
  similarity = jax.random.uniform(k[2], (g, m, n))
  return values, value_centers, similarity


def _encode(values, value_centers, similarity, aggregation, assign_grad="official"):
  assignment = clustering.assign(similarity)
  st = clustering.straight_through_residual(similarity, assign_grad)
  reps = clustering.representatives(values, value_centers, assignment, aggregation, st)
  return clustering.dispatch(reps, similarity, assignment, aggregation, st)


def test_representatives_follow_eq6_of_the_code():
  values = jnp.array([[[1.0], [2.0], [4.0]]])  # one group, 3 points
  value_centers = jnp.array([[[10.0], [20.0]]])
  assignment = jnp.array([[0, 0, 1]])
  for aggregation in ("segment_sum", "onehot"):
    reps = clustering.representatives(values, value_centers, assignment, aggregation)
    np.testing.assert_allclose(reps[0, :, 0], [(10 + 1 + 2) / 3, (20 + 4) / 2])


def test_assign_ties_go_to_lowest_index():
  similarity = jnp.array([[[0.5, 0.1], [0.5, 0.9], [0.2, 0.9]]])  # [G=1, M=3, N=2]
  np.testing.assert_array_equal(clustering.assign(similarity), [[0, 1]])


@pytest.mark.parametrize("assign_grad", ["official", "straight_through"])
def test_aggregations_agree_in_outputs_and_gradients(assign_grad):
  """segment_sum, onehot and auto (whatever it resolves to here): same outputs and gradients."""
  values, value_centers, similarity = _random_cluster_inputs(0)

  def loss(args, aggregation):
    return jnp.sum(jnp.sin(_encode(*args, aggregation, assign_grad)))

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  args = (values, value_centers, similarity)
  expected = _encode(*args, "segment_sum", assign_grad)
  for aggregation in ("onehot", "auto"):
    for g_seg, g_other in zip(grad(args, "segment_sum"), grad(args, aggregation)):
      np.testing.assert_allclose(g_seg, g_other, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        _encode(*args, aggregation, assign_grad), expected, rtol=1e-6, atol=1e-6
    )


def test_onehot_dispatch_is_bit_identical_to_the_gather():
  values, value_centers, similarity = _random_cluster_inputs(3)
  assignment = clustering.assign(similarity)
  reps = clustering.representatives(values, value_centers, assignment, "segment_sum")
  np.testing.assert_array_equal(
      clustering.dispatch(reps, similarity, assignment, "onehot"),
      clustering.dispatch(reps, similarity, assignment, "segment_sum"),
  )


def _stablehlo_ops(platform, aggregation):
  """The StableHLO op names of encode's gradient, lowered for `platform` (no such device needed)."""
  args = _random_cluster_inputs(4)
  grad = jax.jit(jax.grad(lambda a: jnp.sum(_encode(*a, aggregation)) ** 2))
  text = grad.trace(args).lower(lowering_platforms=(platform,)).as_text()
  return set(re.findall(r"stablehlo\.\w+", text)) - {"stablehlo.case"}


@pytest.mark.parametrize("platform", ["cpu", "cuda", "rocm", "tpu"])
def test_auto_resolves_per_lowering_platform(platform):
  """auto lowers to exactly the ops of AUTO_AGGREGATION's choice for the platform; on GPU and TPU
  that is the dense path: no scatter (float atomics) and no gather, forward or backward."""
  choice = clustering.AUTO_AGGREGATION.get(platform, clustering.AUTO_AGGREGATION["default"])
  ops = _stablehlo_ops(platform, "auto")
  assert ops == _stablehlo_ops(platform, choice)
  if platform != "cpu":
    assert choice == "onehot"
    assert not ops & {"stablehlo.scatter", "stablehlo.gather"}
  assert ("stablehlo.scatter" in ops) == (choice == "segment_sum")


def test_straight_through_keeps_forward_and_adds_assignment_gradient():
  values, value_centers, similarity = _random_cluster_inputs(1)
  official = _encode(values, value_centers, similarity, "segment_sum", "official")
  st = _encode(values, value_centers, similarity, "segment_sum", "straight_through")
  np.testing.assert_array_equal(official, st)  # identical forward, bit for bit

  def sim_grad(assign_grad):
    f = lambda s: jnp.sum(_encode(values, value_centers, s, "segment_sum", assign_grad) ** 2)
    return jax.grad(f)(similarity)

  g_off, g_st = sim_grad("official"), sim_grad("straight_through")
  assignment = clustering.assign(similarity)
  not_assigned = jax.nn.one_hot(assignment, similarity.shape[1], axis=1) == 0
  assert np.all(np.asarray(g_off)[np.asarray(not_assigned)] == 0)  # official: only via sim[a_n, n]
  assert np.abs(np.asarray(g_st)[np.asarray(not_assigned)]).max() > 0  # ST: through the argmax too


def test_bad_options_raise():
  values, value_centers, similarity = _random_cluster_inputs(2)
  with pytest.raises(ValueError, match="aggregation"):
    clustering.representatives(values, value_centers, clustering.assign(similarity), "scatter")
  with pytest.raises(ValueError, match="assign_grad"):
    clustering.straight_through_residual(similarity, "gumbel")
