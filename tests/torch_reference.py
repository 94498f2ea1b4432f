"""PyTorch rendition of the official FEC architecture, used as a test fixture.

This is NOT part of the fec_jax package. It was written only from the facts of
the released code that ``docs/official-code.md`` sets out (cited below as "doc §N",
that document's sections), so that the JAX port can be checked against an independent
rendition: forward parity, identical cluster assignments, gradient parity and
weight-conversion round trips.

Public API
----------
``VARIANTS``                      name -> ``FECConfig``
``create_torch_model(name, num_classes=1000, drop_path_rate=0.0,
                     layer_scale_init_value=1e-5) -> FEC``
``FEC.assignments``               after every forward: list, in forward order, of
                                  ``(state-dict prefix, LongTensor)``, see
                                  ``Cluster`` and ``ClusterPool`` for the layouts.

Conventions: tensors are NCHW; H is dim 2 and W is dim 3; a map is flattened to
points row-major over (dim2, dim3) (doc, preamble).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FECConfig",
    "VARIANTS",
    "create_torch_model",
    "FEC",
    "ClusterBlock",
    "Cluster",
    "ClusterPool",
    "Mlp",
    "DropPath",
    "pairwise_cos_sim",
    "fold",
    "unfold",
]


# ----------------------------------------------------------------------------
# Variants (doc §2)
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FECConfig:
  layers: Tuple[int, int, int, int]
  embed_dims: Tuple[int, int, int, int]
  mlp_ratios: Tuple[int, int, int, int]
  heads: Tuple[int, int, int, int]
  head_dim: int
  centers: Tuple[Tuple[int, int], ...]  # per stage, (dim2, dim3)
  folds: Tuple[int, int, int, int]  # regions per side, per stage
  fork_feat: bool  # dense-prediction variant (doc §6)


_ARCH = {
    "small": dict(
        layers=(3, 4, 5, 2), embed_dims=(32, 64, 196, 320), heads=(4, 4, 8, 8), head_dim=24
    ),
    "base": dict(
        layers=(2, 2, 6, 2), embed_dims=(64, 128, 320, 512), heads=(4, 4, 8, 8), head_dim=32
    ),
    "large": dict(
        layers=(4, 4, 12, 4), embed_dims=(64, 128, 320, 512), heads=(6, 6, 12, 12), head_dim=32
    ),
}
_TASK = {
    "": dict(centers=((4, 4), (4, 4), (2, 2), (2, 2)), folds=(1, 1, 1, 1), fork_feat=False),
    "_seg": dict(centers=((10, 10), (10, 10), (5, 5), (5, 5)), folds=(1, 1, 1, 1), fork_feat=True),
    "_det": dict(centers=((7, 7),) * 4, folds=(2, 2, 1, 1), fork_feat=True),
}
VARIANTS: Dict[str, FECConfig] = {
    f"fec_{size}{task}": FECConfig(mlp_ratios=(8, 8, 4, 4), **arch, **tcfg)
    for size, arch in _ARCH.items()
    for task, tcfg in _TASK.items()
}


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
def pairwise_cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
  """a [b', M, D], b [b', N, D] -> [b', M, N]; vectors divided by max(||.||, 1e-12) (doc §3)."""
  a = F.normalize(a, dim=-1, eps=1e-12)
  b = F.normalize(b, dim=-1, eps=1e-12)
  return a @ b.transpose(-2, -1)


def fold(x: torch.Tensor, f: int) -> torch.Tensor:
  """[b, c, f*h, f*w] -> [(b f1 f2), c, h, w]; region index r1*f + r2 (doc §3, fold)."""
  if f == 1:
    return x
  b, c, H, W = x.shape
  x = x.reshape(b, c, f, H // f, f, W // f)  # b c f1 h f2 w
  return x.permute(0, 2, 4, 1, 3, 5).reshape(b * f * f, c, H // f, W // f)


def unfold(x: torch.Tensor, f: int) -> torch.Tensor:
  """Inverse of ``fold``: [(b f1 f2), c, h, w] -> [b, c, f*h, f*w]."""
  if f == 1:
    return x
  bff, c, h, w = x.shape
  x = x.reshape(bff // (f * f), f, f, c, h, w)  # b f1 f2 c h w
  return x.permute(0, 3, 1, 4, 2, 5).reshape(bff // (f * f), c, f * h, f * w)


def _check_fold(name: str, H: int, W: int, f: int) -> None:
  if H % f or W % f:
    raise ValueError(f"{name}: map size {H}x{W} is not divisible by the fold {f}")


def _cluster_points(
    sim: torch.Tensor, value_c: torch.Tensor, value_p: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """Hard assignment + representatives (doc §3, ClusterPool steps 4-5 / Cluster steps 4-5).

  sim [b', M, N] (the score whose argmax assigns), value_c [b', M, D], value_p [b', N, D].
  Returns (idx [b', N] long, sim at the assigned center [b', N], reps [b', M, D]).
  """
  bb, M, N = sim.shape
  D = value_p.shape[-1]
  # torch.argmax returns the first maximal index: ties go to the lowest center (doc §3 step 4).
  # The index is an integer tensor, i.e. the one-hot mask is a constant (doc §4).
  idx = sim.argmax(dim=1)  # [b', N]
  sim_assigned = sim.gather(1, idx.unsqueeze(1)).squeeze(1)  # [b', N]
  # scatter_sum over points, as torch_scatter.scatter_sum in the official code.
  sums = value_p.new_zeros(bb, M, D).scatter_add_(1, idx.unsqueeze(-1).expand(bb, N, D), value_p)
  counts = value_p.new_zeros(bb, M).scatter_add_(1, idx, value_p.new_ones(bb, N))
  reps = (sums + value_c) / (counts.unsqueeze(-1) + 1.0)  # [b', M, D]
  return idx, sim_assigned, reps


def _margin(sim: torch.Tensor) -> torch.Tensor:
  """Gap between the best and second-best center of each point, [b', N] (for diagnosing ties)."""
  if sim.shape[1] < 2:
    return torch.full_like(sim[:, 0], float("inf")).detach()
  top2 = sim.detach().topk(2, dim=1).values  # [b', 2, N]
  return top2[:, 0] - top2[:, 1]


def _to_points(x: torch.Tensor) -> torch.Tensor:
  """[b, c, h, w] -> [b, h*w, c], row-major over (dim2, dim3)."""
  return x.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------
class DropPath(nn.Module):
  """timm drop_path: drop whole samples, rescale survivors by 1/keep (doc §3)."""

  def __init__(self, drop_prob: float = 0.0):
    super().__init__()
    self.drop_prob = float(drop_prob)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.drop_prob == 0.0 or not self.training:
      return x
    keep = 1.0 - self.drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0:
      mask.div_(keep)
    return x * mask

  def extra_repr(self) -> str:
    return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2, nn.Linear applied channels-last (doc §1, §3)."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()  # erf form
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
    return self.fc2(self.act(self.fc1(x)))


class Cluster(nn.Module):
  """Clustering-based feature encoding, the token mixer (doc §3, Cluster).

  ``last_assignment`` after forward: LongTensor [B, heads, H, W] with value
  ``region * M + m``: region = r1*fold + r2 (r1 over dim2), M = centers per
  region, m = row-major index of the argmax center in the region's center grid.
  """

  def __init__(self, dim: int, heads: int, head_dim: int, centers: Tuple[int, int], fold_: int):
    super().__init__()
    inner = heads * head_dim
    self.heads, self.head_dim = heads, head_dim
    self.centers, self.fold = tuple(centers), fold_
    self.f = nn.Conv2d(dim, inner, 1)
    self.v = nn.Conv2d(dim, inner, 1)
    self.proj = nn.Conv2d(inner, dim, 1)
    self.sim_alpha = nn.Parameter(torch.ones(1))
    self.sim_beta = nn.Parameter(torch.zeros(1))
    self.layer_name = "Cluster"
    self.last_assignment: Optional[torch.Tensor] = None
    self.last_margin: Optional[torch.Tensor] = None  # top-1 minus top-2 score, same layout

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
    B, _, H, W = x.shape
    E, D, f = self.heads, self.head_dim, self.fold
    _check_fold(self.layer_name, H, W, f)
    value, feat = self.v(x), self.f(x)  # [B, E*D, H, W]
    # heads first ("b (e c) h w -> (b e) c h w"), then regions.
    value = fold(value.reshape(B * E, D, H, W), f)  # [B*E*f*f, D, h, w]
    feat = fold(feat.reshape(B * E, D, H, W), f)
    h, w = H // f, W // f
    # centers by PyTorch adaptive average pooling (doc §3 Cluster step 2).
    feat_c = _to_points(F.adaptive_avg_pool2d(feat, self.centers))  # [b', M, D]
    value_c = _to_points(F.adaptive_avg_pool2d(value, self.centers))  # [b', M, D]
    feat_p, value_p = _to_points(feat), _to_points(value)  # [b', N, D], N = h*w
    # sigmoid similarity; the argmax is taken over it (doc §3 steps 3-4).
    sim = torch.sigmoid(
        self.sim_beta + self.sim_alpha * pairwise_cos_sim(feat_c, feat_p)
    )  # [b', M, N]
    idx, sim_assigned, reps = _cluster_points(sim, value_c, value_p)
    self.last_margin = (
        _margin(sim).reshape(B, E, f, f, h, w).permute(0, 1, 2, 4, 3, 5).reshape(B, E, H, W)
    )
    # dispatch: representative[assigned] * sim[assigned, n] (doc §3 step 6).
    out = reps.gather(1, idx.unsqueeze(-1).expand(-1, -1, D)) * sim_assigned.unsqueeze(
        -1
    )  # [b', N, D]
    out = out.transpose(1, 2).reshape(-1, D, h, w)
    out = unfold(out, f).reshape(B, E * D, H, W)  # merge heads back to channels
    self._record(idx, B, h, w)
    return self.proj(out)  # [B, C, H, W]

  def _record(self, idx: torch.Tensor, B: int, h: int, w: int) -> None:
    E, f = self.heads, self.fold
    M = self.centers[0] * self.centers[1]
    idx = idx.detach().reshape(B, E, f, f, h, w)  # b e r1 r2 h w
    region = torch.arange(f * f, device=idx.device).reshape(1, 1, f, f, 1, 1)
    glob = region * M + idx
    self.last_assignment = glob.permute(0, 1, 2, 4, 3, 5).reshape(B, E, f * h, f * w)


class ClusterPool(nn.Module):
  """Clustering-based feature pooling between stages (doc §3, ClusterPool).

  ``last_assignment`` after forward: LongTensor [B, H, W] holding the row-major
  flat index into the output map [H/2, W/2] of the center each point joined.

  Fold: that of the stage the pool leads into (the official constructor passes
  fold_w[i + 1]; the reference doc's §3 leaves it open). Convs and GroupNorm act on the whole
  map; only the clustering runs per region; the representatives are stitched back before norm2.
  """

  def __init__(self, in_dim: int, out_dim: int, fold_: int = 1):
    super().__init__()
    self.fold = fold_
    self.conv_f = nn.Conv2d(in_dim, out_dim, 1)
    self.conv_v = nn.Conv2d(in_dim, out_dim, 1)
    self.conv_skip = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
    self.norm2 = nn.GroupNorm(1, out_dim)
    self.layer_name = "ClusterPool"
    self.last_assignment: Optional[torch.Tensor] = None
    self.last_margin: Optional[torch.Tensor] = None  # top-1 minus top-2 score, same layout

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, H, W]
    B, _, H, W = x.shape
    f = self.fold
    _check_fold(self.layer_name, H, W, f)
    h, w = H // f, W // f
    if h % 2 or w % 2:
      raise ValueError(
          f"{self.layer_name}: map size {H}x{W} (region {h}x{w}, fold {f}) is odd; "
          "the skip and pooled branches would disagree in shape"
      )
    identity = self.conv_skip(x)  # [B, Cout, H/2, W/2]
    value = fold(self.conv_v(x), f)  # [b', Cout, h, w]
    feat = fold(self.conv_f(x), f)
    ch, cw = h // 2, w // 2
    feat_c = _to_points(F.adaptive_avg_pool2d(feat, (ch, cw)))  # [b', M, C]
    value_c = _to_points(F.adaptive_avg_pool2d(value, (ch, cw)))
    feat_p, value_p = _to_points(feat), _to_points(value)  # [b', N, C]
    sim = pairwise_cos_sim(feat_c, feat_p)  # raw cosine, no sigmoid (doc §3 step 3)
    idx, _, reps = _cluster_points(sim, value_c, value_p)
    self.last_margin = _margin(sim).reshape(B, f, f, h, w).permute(0, 1, 3, 2, 4).reshape(B, H, W)
    C = reps.shape[-1]
    reps = unfold(reps.transpose(1, 2).reshape(-1, C, ch, cw), f)  # [B, Cout, H/2, W/2]
    self._record(idx, B, h, w)
    return identity + self.norm2(reps)

  def _record(self, idx: torch.Tensor, B: int, h: int, w: int) -> None:
    f = self.fold
    ch, cw = h // 2, w // 2
    idx = idx.detach().reshape(B, f, f, h, w)  # b r1 r2 h w
    dev = idx.device
    r1 = torch.arange(f, device=dev).reshape(1, f, 1, 1, 1)
    r2 = torch.arange(f, device=dev).reshape(1, 1, f, 1, 1)
    row = r1 * ch + torch.div(idx, cw, rounding_mode="floor")
    col = r2 * cw + idx % cw
    glob = row * (f * cw) + col  # index into [H/2, W/2]
    self.last_assignment = glob.permute(0, 1, 3, 2, 4).reshape(B, f * h, f * w)


class ClusterBlock(nn.Module):
  """x + dp(ls1 * Cluster(GN(x))); x + dp(ls2 * Mlp(GN(x))) (doc §3, ClusterBlock)."""

  def __init__(
      self, dim, mlp_ratio, heads, head_dim, centers, fold_, drop_path, layer_scale_init_value
  ):
    super().__init__()
    self.norm1 = nn.GroupNorm(1, dim)  # eps 1e-5
    self.token_mixer = Cluster(dim, heads, head_dim, centers, fold_)
    self.norm2 = nn.GroupNorm(1, dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
    self.layer_scale_1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
    self.layer_scale_2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
    ls1 = self.layer_scale_1[:, None, None]
    ls2 = self.layer_scale_2[:, None, None]
    x = x + self.drop_path(ls1 * self.token_mixer(self.norm1(x)))
    y = self.mlp(self.norm2(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # channels-last Linear
    return x + self.drop_path(ls2 * y)


class PatchEmbed(nn.Module):
  """Conv2d(5 -> C0, 4, stride 4); norm is Identity (no keys) (doc §1)."""

  def __init__(self, in_chans: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, dim, kernel_size=4, stride=4, padding=0)
    self.norm = nn.Identity()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.norm(self.proj(x))


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------
class FEC(nn.Module):

  def __init__(
      self,
      cfg: FECConfig,
      num_classes: int = 1000,
      drop_path_rate: float = 0.0,
      layer_scale_init_value: float = 1e-5,
  ):
    super().__init__()
    self.cfg = cfg
    self.fork_feat = cfg.fork_feat
    dims = cfg.embed_dims
    self.patch_embed = PatchEmbed(5, dims[0])
    total = sum(cfg.layers)
    network: List[nn.Module] = []
    k = 0
    for s in range(4):
      blocks = []
      for _ in range(cfg.layers[s]):
        # linear drop-path rate over all blocks (doc §3)
        dpr = drop_path_rate * k / (total - 1) if total > 1 else 0.0
        blocks.append(
            ClusterBlock(
                dims[s],
                cfg.mlp_ratios[s],
                cfg.heads[s],
                cfg.head_dim,
                cfg.centers[s],
                cfg.folds[s],
                dpr,
                layer_scale_init_value,
            )
        )
        k += 1
      network.append(nn.Sequential(*blocks))
      if s < 3:
        network.append(ClusterPool(dims[s], dims[s + 1], cfg.folds[s + 1]))  # next stage's fold
    self.network = nn.ModuleList(network)
    if self.fork_feat:
      for i in (0, 2, 4, 6):
        self.add_module(f"norm{i}", nn.GroupNorm(1, dims[i // 2]))  # doc §6
    else:
      self.norm = nn.GroupNorm(1, dims[-1])
      self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
    self.apply(self._init_weights)
    # names for error messages and assignment recording (plain attributes, not state).
    self._cluster_names: List[str] = []
    for name, m in self.named_modules():
      if isinstance(m, (Cluster, ClusterPool)):
        m.layer_name = name
        self._cluster_names.append(name)
    self.assignments: List[Tuple[str, torch.Tensor]] = []

  @staticmethod
  def _init_weights(m: nn.Module) -> None:
    # doc §5: Linear trunc_normal(std .02, cut +-2 absolute), bias 0; convs keep
    # PyTorch defaults; GroupNorm defaults are 1/0.
    if isinstance(m, nn.Linear):
      nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
      if m.bias is not None:
        nn.init.zeros_(m.bias)

  @staticmethod
  def add_coords(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> [B,5,H,W]: channel 3 = i/(H-1)-0.5 (rows), 4 = j/(W-1)-0.5 (doc §3)."""
    B, _, H, W = x.shape
    rh = torch.arange(H, dtype=torch.float32, device=x.device) / (H - 1.0)
    rw = torch.arange(W, dtype=torch.float32, device=x.device) / (W - 1.0)
    pos = torch.stack(torch.meshgrid(rh, rw, indexing="ij"), dim=0) - 0.5  # [2, H, W]
    return torch.cat([x, pos.to(x.dtype).unsqueeze(0).expand(B, -1, -1, -1)], dim=1)

  def forward_features(self, x: torch.Tensor):
    x = self.patch_embed(self.add_coords(x))  # [B, C0, H/4, W/4]
    outs = []
    for i, layer in enumerate(self.network):
      x = layer(x)
      if self.fork_feat and i % 2 == 0:
        outs.append(getattr(self, f"norm{i}")(x))
    return outs if self.fork_feat else x

  def forward(self, x: torch.Tensor):
    self.assignments = []
    for name in self._cluster_names:
      self.get_submodule(name).last_assignment = None
    out = self.forward_features(x)
    self.assignments = [(n, self.get_submodule(n).last_assignment) for n in self._cluster_names]
    self.margins = [(n, self.get_submodule(n).last_margin) for n in self._cluster_names]
    if self.fork_feat:
      return out  # list of 4 NCHW maps, strides 4, 8, 16, 32
    x = self.norm(out).mean(dim=(2, 3))  # [B, C3]
    return self.head(x)  # [B, num_classes]


def create_torch_model(
    name: str,
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    layer_scale_init_value: float = 1e-5,
) -> FEC:
  if name not in VARIANTS:
    raise ValueError(f"unknown FEC variant {name!r}; choose from {sorted(VARIANTS)}")
  return FEC(
      VARIANTS[name],
      num_classes=num_classes,
      drop_path_rate=drop_path_rate,
      layer_scale_init_value=layer_scale_init_value,
  )
