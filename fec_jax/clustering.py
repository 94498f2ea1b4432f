"""The clustering operations of FEC as pure functions.

Naming follows the paper (Sec. 3): *centers* are initialized by adaptive average pooling (Eq. 4),
every point gets an *assignment* to its most similar center (Eq. 5), the assigned points are
aggregated into *representatives* (Eq. 6), and the encoding layer *dispatches* each representative
back to the points of its cluster (Eq. 7). Where the released code differs from the paper, these
functions follow the code (docs/official-code.md).

Shapes: G is a flat group axis (batch x heads x fold regions; ClusterPool has no heads), N = h*w
points, M centers, D channels. The paper writes O for the number of centers and M for the
similarity matrix (Eq. 5, [N, O]); here that matrix, transposed, is `cosine_similarity`'s
[G, M, N], and `similarity` is it passed through the layer's `similarity_map` (Cluster: Eq. 7's
sigmoid(beta + alpha M); ClusterPool: M itself). The paper's K and V are the layers' `feat` and
`value` (fec_jax.model), the points and values here.
"""

from __future__ import annotations

import functools
import typing
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

Aggregation = Literal["auto", "segment_sum", "onehot"]
AGGREGATIONS = typing.get_args(Aggregation)
AssignGrad = Literal["official", "straight_through"]
ASSIGN_GRADS = typing.get_args(AssignGrad)

# What "auto" runs per lowering platform (see docs/models.md). GPU and TPU: the dense one-hot
# matmuls, since XLA:GPU lowers an fp32 scatter-add of many points into few centers to a slow
# compare-and-swap loop (and float atomics are not deterministic), and TPU scatters are slow.
# CPU: segment_sum, measured faster on a 2-core VM (fec_small 224x224 batch 8; docs/models.md).
AUTO_AGGREGATION = {"cpu": "segment_sum", "default": "onehot"}


class Kernels(NamedTuple):
  """One aggregation implementation (M centers fixed):
  sums(values [G, N, D], assignment [G, N]) -> (sums [G, M, D], counts [G, M]) of Eq. 6;
  dispatch(reps [G, M, D], similarity [G, M, N], assignment [G, N]) -> [G, N, D], Eq. 7's
  R[a_n] * sim[a_n, n]."""

  sums: Callable
  dispatch: Callable


def adaptive_window_matrix(in_size: int, out_size: int) -> jnp.ndarray:
  """0/1 matrix [out_size, in_size] of PyTorch's adaptive-pool windows (docs/official-code.md
  Sec. 3, "Adaptive average pooling").

  Output i averages input [floor(i*L/n), ceil((i+1)*L/n)): windows overlap when L % n != 0, and
  out_size may exceed in_size.
  """
  rows = []
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    rows.append([1.0 if start <= j < end else 0.0 for j in range(in_size)])
  return jnp.asarray(rows, jnp.float32)


def adaptive_avg_pool(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
  """PyTorch-exact adaptive average pooling over the spatial axes of x [..., H, W, D], in at least
  fp32 (at_least_f32): Eq. 4's centers of bf16 features are not rounded to bf16.

  Returns [..., oh, ow, D]. Sums each window, then divides by its size, as torch's CPU kernel does.
  """
  x = at_least_f32(x)
  *lead, h, w, d = x.shape
  oh, ow = out_hw
  if h % oh == 0 and w % ow == 0:  # equal, disjoint windows: a reshape-sum (cheaper than matmuls)
    kh, kw = h // oh, w // ow
    sums = x.reshape(*lead, oh, kh, ow, kw, d).sum(axis=(-4, -2))  # [..., oh, ow, D]
    return sums / (kh * kw)
  rows, cols = adaptive_window_matrix(h, oh), adaptive_window_matrix(w, ow)  # [oh, H], [ow, W]
  sums = jnp.einsum("ih,jw,...hwd->...ijd", rows, cols, x, precision=jax.lax.Precision.HIGHEST)
  counts = rows.sum(1)[:, None] * cols.sum(1)[None, :]  # [oh, ow]
  return sums / counts[:, :, None].astype(x.dtype)


def fold(x: jnp.ndarray, regions: int) -> jnp.ndarray:
  """Splits x [B, H, W, ...] into regions x regions equal tiles: [B, r1, r2, H/r, W/r, ...], the
  fold regions, each clustered on its own (docs/official-code.md Sec. 2; Sec. 3, ClusterPool)."""
  b, h, w, *rest = x.shape
  # [B, r1, H/r, r2, W/r, ...], then r2 moved next to r1
  x = x.reshape(b, regions, h // regions, regions, w // regions, *rest)
  return jnp.moveaxis(x, 3, 2)


def unfold(x: jnp.ndarray) -> jnp.ndarray:
  """Inverse of `fold`: [B, r1, r2, h, w, ...] -> [B, r1*h, r2*w, ...]."""
  b, r1, r2, h, w, *rest = x.shape
  return jnp.moveaxis(x, 2, 3).reshape(b, r1 * h, r2 * w, *rest)


def normalize(x: jnp.ndarray) -> jnp.ndarray:
  """x / max(||x||_2, 1e-12) over the last axis, as torch.nn.functional.normalize."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def at_least_f32(x: jnp.ndarray) -> jnp.ndarray:
  """Clustering math runs in fp32 (or fp64) even under bf16 compute, so assignments do not flip."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cosine_similarity(centers: jnp.ndarray, points: jnp.ndarray) -> jnp.ndarray:
  """Eq. 5: cosine between every center [G, M, D] and point [G, N, D] -> [G, M, N] (>= fp32)."""
  centers, points = normalize(at_least_f32(centers)), normalize(at_least_f32(points))
  return jnp.einsum("gmd,gnd->gmn", centers, points, precision=jax.lax.Precision.HIGHEST)


def assign(similarity: jnp.ndarray) -> jnp.ndarray:
  """Eq. 5's hard assignment [G, N]: argmax over the M centers of similarity [G, M, N], ties to
  the lowest. In Cluster the argmax is of the sigmoid, not of the cosine, as in the code
  (docs/official-code.md Sec. 3, Cluster 4)."""
  return jnp.argmax(similarity, axis=1).astype(jnp.int32)


def straight_through_residual(similarity: jnp.ndarray, assign_grad: AssignGrad):
  """The part of the assignment matrix [G, M, N] that is zero forward and carries gradient.

  "official": None (the one-hot is a constant, docs/official-code.md Sec. 4).
  "straight_through": softmax over the centers minus its stop-gradient copy, so d(one-hot) is
  taken as d(softmax(similarity)).
  """
  if assign_grad == "official":
    return None
  if assign_grad not in ASSIGN_GRADS:
    raise ValueError(f"assign_grad must be one of {ASSIGN_GRADS}, got {assign_grad!r}")
  soft = jax.nn.softmax(similarity, axis=1)  # [G, M, N]
  return soft - jax.lax.stop_gradient(soft)


def _segment_sum_kernels(m: int) -> Kernels:
  """The official code's scatter-add (Eq. 6) and a gather of each point's representative (Eq. 7)."""

  def sums(values, assignment):
    g, n, d = values.shape
    segments = (assignment + m * jnp.arange(g, dtype=jnp.int32)[:, None]).reshape(-1)  # [G*N]
    sums = jax.ops.segment_sum(values.reshape(g * n, d), segments, num_segments=g * m)
    counts = jax.ops.segment_sum(jnp.ones((g * n,), values.dtype), segments, num_segments=g * m)
    return sums.reshape(g, m, d), counts.reshape(g, m)

  def dispatch(reps, similarity, assignment):
    weight = jnp.take_along_axis(similarity, assignment[:, None, :], axis=1)[:, 0]  # [G, N]
    gathered = jnp.take_along_axis(reps, assignment[..., None], axis=1)  # [G, N, D]
    return gathered * weight[..., None].astype(reps.dtype)

  return Kernels(sums, dispatch)


def _onehot_kernels(m: int) -> Kernels:
  """Dense and atomics-free: both sums are matmuls with the assignment matrix [G, M, N].

  The matrix keeps the similarity's [G, M, N] layout (no transpose), and the dispatch factor is
  picked by masking the similarity with it, so neither direction has a gather or a scatter
  (take_along_axis's gradient would be a scatter-add). Forward, dispatch is bit-identical to
  segment_sum's; the sums of Eq. 6 differ only in summation order.
  """

  def member(assignment):  # [G, N] -> [G, M, N] bool
    return assignment[:, None, :] == jnp.arange(m, dtype=assignment.dtype)[None, :, None]

  def sums(values, assignment):
    onehot = member(assignment).astype(values.dtype)  # [G, M, N]
    sums = jnp.einsum("gmn,gnd->gmd", onehot, values, precision=jax.lax.Precision.HIGHEST)
    return sums, onehot.sum(axis=-1)

  def dispatch(reps, similarity, assignment):
    is_member = member(assignment)
    weight = jnp.sum(jnp.where(is_member, similarity, 0), axis=1)  # [G, N], sim[a_n, n]
    # Picking the weight before the matmul keeps its gradient elementwise (no [G, M, N] matmul).
    gathered = jnp.einsum(
        "gmn,gmd->gnd", is_member.astype(reps.dtype), reps, precision=jax.lax.Precision.HIGHEST
    )  # R[a_n], exact
    return gathered * weight[..., None].astype(reps.dtype)

  return Kernels(sums, dispatch)


_KERNELS = {"segment_sum": _segment_sum_kernels, "onehot": _onehot_kernels}


def _run_kernel(aggregation: Aggregation, op: str, m: int, *args):
  """Runs `op` ("sums" or "dispatch") of the aggregation kernels that `aggregation` names: the
  one place where the backend-specific kernels are chosen.

  "auto" stages out `lax.platform_dependent`, so it is resolved when the program is lowered, for
  the platform it is lowered for (also for a TPU program compiled on a CPU-only machine):
  AUTO_AGGREGATION[platform], its "default" on any other platform.
  """
  if aggregation == "auto":
    branches = {
        platform: functools.partial(_run_kernel, choice, op, m)
        for platform, choice in AUTO_AGGREGATION.items()
    }
    return jax.lax.platform_dependent(*args, default=branches.pop("default"), **branches)
  if aggregation not in _KERNELS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
  return getattr(_KERNELS[aggregation](m), op)(*args)


def representatives(
    values: jnp.ndarray,
    value_centers: jnp.ndarray,
    assignment: jnp.ndarray,
    aggregation: Aggregation = "auto",
    st=None,
) -> jnp.ndarray:
  """Eq. 6: R_m = (C^v_m + sum_{n in m} V_n) / (1 + |m|) (docs/official-code.md Sec. 3,
  ClusterPool 5).

  values [G, N, D], value_centers [G, M, D], assignment [G, N] -> [G, M, D]. The official code sums
  with a scatter-add; "segment_sum" is that, "onehot" the same sum as a one-hot matmul.
  st: straight_through_residual's [G, M, N] (zero forward; it carries the assignment's gradient
  under assign_grad="straight_through"), or None.
  """
  sums, counts = _run_kernel(aggregation, "sums", value_centers.shape[1], values, assignment)
  if st is not None:  # zero forward; gradient of the assignment (straight-through), [G, M, N]
    sums = sums + jnp.einsum("gmn,gnd->gmd", st.astype(values.dtype), values)
    counts = counts + st.sum(axis=-1).astype(values.dtype)
  return (sums + value_centers) / (counts[..., None] + 1.0)


def dispatch(
    reps: jnp.ndarray,
    similarity: jnp.ndarray,
    assignment: jnp.ndarray,
    aggregation: Aggregation = "auto",
    st=None,
) -> jnp.ndarray:
  """Eq. 7's dispatch: point n receives only its own center's R[a_n] * sim[a_n, n], as the code
  does, where Algorithm S1 sums over all centers (docs/official-code.md Sec. 3, Cluster 6).

  reps [G, M, D], similarity [G, M, N], assignment [G, N] -> [G, N, D]. st: as in
  representatives.
  """
  out = _run_kernel(aggregation, "dispatch", reps.shape[1], reps, similarity, assignment)
  if st is not None:
    out = out + jnp.einsum("gmn,gmd->gnd", (st * similarity).astype(reps.dtype), reps)
  return out


class Clustering(NamedTuple):
  """What `cluster` computes for G groups of N points and M centers of D channels."""

  centers: jnp.ndarray  # Eq. 4, [G, M, D], at least fp32 (adaptive_avg_pool)
  similarity: jnp.ndarray  # similarity_map of Eq. 5's cosine, [G, M, N]
  assignment: jnp.ndarray  # Eq. 5's argmax, [G, N]
  st: jnp.ndarray | None  # straight_through_residual, [G, M, N] or None
  representatives: jnp.ndarray  # Eq. 6, [G, M, D]


def cluster(
    feat: jnp.ndarray,
    value: jnp.ndarray,
    centers_hw: tuple[int, int],
    similarity_map: Callable = lambda cosine: cosine,
    aggregation: Aggregation = "auto",
    assign_grad: AssignGrad = "official",
) -> Clustering:
  """Eqs. 4-6, the steps that Cluster and ClusterPool share: centers of feat [G, h, w, D] (and
  of value [G, h, w, D]) by adaptive average pooling to centers_hw, each point's cosine to every
  center passed through `similarity_map` (Cluster's sigmoid(beta + alpha cos); ClusterPool's
  identity), the assignment by its argmax, and the representatives of the values.
  """
  g, h, w, _ = feat.shape
  m = centers_hw[0] * centers_hw[1]
  centers = adaptive_avg_pool(feat, centers_hw).reshape(g, m, -1)  # Eq. 4, [G, M, D]
  value_centers = adaptive_avg_pool(value, centers_hw).reshape(g, m, -1)  # Eq. 4's C^v, [G, M, D]
  cosine = cosine_similarity(centers, feat.reshape(g, h * w, -1))  # Eq. 5, [G, M, N]
  similarity = similarity_map(cosine)  # [G, M, N]
  assignment = assign(similarity)  # [G, N]
  st = straight_through_residual(similarity, assign_grad)  # [G, M, N] or None
  values = at_least_f32(value.reshape(g, h * w, -1))  # [G, N, D]
  reps = representatives(values, value_centers, assignment, aggregation, st)  # Eq. 6
  return Clustering(centers, similarity, assignment, st, reps)


def check_divisible(layer: str, hw: tuple[int, int], regions: int) -> None:
  """ValueError where the official code would crash on a fold that does not divide the map."""
  if hw[0] % regions or hw[1] % regions:
    raise ValueError(
        f"{layer}: feature map {hw[0]}x{hw[1]} cannot be split into {regions}x{regions} "
        f"fold regions; choose an input size whose map at this layer divides by {regions}"
    )
