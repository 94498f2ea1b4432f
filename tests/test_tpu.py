"""The auto aggregation compiled by libtpu for a TPU slice that is not attached: no scatter and no
gather in the optimized TPU program, forward and backward.

Needs the [tpu] extra (libtpu), which CI does not install: there the test is skipped, and
tests/test_clustering.py checks the same per-platform choice on the StableHLO. Compiling the whole
model for a TPU takes minutes on 2 cores, so that check is a command (README, Performance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

pytest.importorskip("libtpu")

import bench  # noqa: E402
from fec_jax import clustering  # noqa: E402


@pytest.mark.parametrize("aggregation", ["auto", "segment_sum"])
def test_auto_compiles_for_tpu_without_scatter_or_gather(aggregation):
  devices = bench.tpu_devices("v5e:2x2")
  sharded = NamedSharding(Mesh(np.asarray(devices), ("g",)), P("g"))

  def loss(values, value_centers, similarity):  # one Cluster layer of stage 0, 16 groups
    assignment = clustering.assign(similarity)
    reps = clustering.representatives(values, value_centers, assignment, aggregation)
    return jnp.sum(clustering.dispatch(reps, similarity, assignment, aggregation) ** 2)

  shapes = [(16, 3136, 24), (16, 16, 24), (16, 16, 3136)]  # [G, N, D], [G, M, D], [G, M, N]
  args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharded) for s in shapes]
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  hlo = grad.trace(*args).lower().compile().as_text()
  if aggregation == "auto":
    assert " scatter(" not in hlo and " gather(" not in hlo
  else:  # the check sees them where they are
    assert " scatter(" in hlo and " gather(" in hlo
