"""Self-checks of the PyTorch FEC reference fixture (tests/torch_reference.py).

Besides shapes and parameter counts, Cluster and ClusterPool are compared with a
deliberately naive loop implementation written straight from the reference
document (explicit PyTorch adaptive-pool windows, explicit argmax with ties to
the lowest index, constant one-hot mask), forward and backward.
"""

import math

import pytest
import torch
import torch.nn as nn

import torch_reference as R

torch.set_num_threads(min(2, torch.get_num_threads()))


def _n_params(model):
  return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def small():
  torch.manual_seed(0)
  return R.create_torch_model("fec_small").eval()


# ----------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,count", [("fec_small", 5_727_528), ("fec_base", 15_086_848), ("fec_large", 29_720_344)]
)
def test_parameter_counts(name, count):
  with torch.device("meta"):  # shapes only, skips the (slow) random init
    model = R.create_torch_model(name, num_classes=1000)
    dense = [R.create_torch_model(name + t) for t in ("_seg", "_det")]
  assert _n_params(model) == count
  # dense variants: no norm/head, plus norm0/2/4/6
  dims = R.VARIANTS[name].embed_dims
  expected = count - 2 * dims[3] - (dims[3] * 1000 + 1000) + sum(2 * d for d in dims)
  assert [_n_params(m) for m in dense] == [expected, expected]


def test_variants_table():
  assert set(R.VARIANTS) == {
      f"fec_{s}{t}" for s in ("small", "base", "large") for t in ("", "_seg", "_det")
  }
  assert R.VARIANTS["fec_large"].heads == (6, 6, 12, 12)
  assert R.VARIANTS["fec_small"].head_dim == 24
  assert R.VARIANTS["fec_base_seg"].centers == ((10, 10), (10, 10), (5, 5), (5, 5))
  assert R.VARIANTS["fec_base_det"].folds == (2, 2, 1, 1)
  with pytest.raises(ValueError):
    R.create_torch_model("fec_tiny")


def test_state_dict_keys(small):
  sd = small.state_dict()
  assert len(list(small.buffers())) == 0
  assert len(sd) == len(list(small.parameters()))
  assert sd["patch_embed.proj.weight"].shape == (32, 5, 4, 4)
  assert not any(k.startswith("patch_embed.norm") for k in sd)
  block = {k[len("network.0.0.") :] for k in sd if k.startswith("network.0.0.")}
  assert block == {
      "norm1.weight",
      "norm1.bias",
      "token_mixer.f.weight",
      "token_mixer.f.bias",
      "token_mixer.v.weight",
      "token_mixer.v.bias",
      "token_mixer.proj.weight",
      "token_mixer.proj.bias",
      "token_mixer.sim_alpha",
      "token_mixer.sim_beta",
      "norm2.weight",
      "norm2.bias",
      "mlp.fc1.weight",
      "mlp.fc1.bias",
      "mlp.fc2.weight",
      "mlp.fc2.bias",
      "layer_scale_1",
      "layer_scale_2",
  }
  assert sd["network.0.0.token_mixer.f.weight"].shape == (96, 32, 1, 1)
  assert sd["network.0.0.token_mixer.proj.weight"].shape == (32, 96, 1, 1)
  assert sd["network.0.0.token_mixer.sim_alpha"].shape == (1,)
  assert sd["network.0.0.mlp.fc1.weight"].shape == (256, 32)
  assert sd["network.0.0.mlp.fc2.weight"].shape == (32, 256)
  assert sd["network.0.0.layer_scale_1"].shape == (32,)
  for i, (cin, cout) in zip((1, 3, 5), ((32, 64), (64, 196), (196, 320))):
    pool = {k[len(f"network.{i}.") :] for k in sd if k.startswith(f"network.{i}.")}
    assert pool == {
        f"{m}.{p}" for m in ("conv_f", "conv_v", "conv_skip", "norm2") for p in ("weight", "bias")
    }
    assert sd[f"network.{i}.conv_f.weight"].shape == (cout, cin, 1, 1)
    assert sd[f"network.{i}.conv_skip.weight"].shape == (cout, cin, 3, 3)
  for s, n in zip((0, 2, 4, 6), (3, 4, 5, 2)):
    assert {k.split(".")[2] for k in sd if k.startswith(f"network.{s}.")} == {
        str(j) for j in range(n)
    }
  assert not any(k.startswith("network.7") for k in sd)
  assert sd["norm.weight"].shape == (320,) and sd["head.weight"].shape == (1000, 320)
  dense = R.create_torch_model("fec_small_det").state_dict()
  assert not any(k.startswith(("norm.", "head.")) for k in dense)
  assert [dense[f"norm{i}.weight"].shape[0] for i in (0, 2, 4, 6)] == [32, 64, 196, 320]


def test_init():
  torch.manual_seed(0)
  m = R.create_torch_model("fec_small", layer_scale_init_value=1e-5)
  for mod in m.modules():
    if isinstance(mod, nn.Linear):
      assert torch.all(mod.bias == 0)
      assert abs(mod.weight.std().item() - 0.02) < 0.004
    if isinstance(mod, nn.GroupNorm):
      assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    if isinstance(mod, R.Cluster):
      assert mod.sim_alpha.item() == 1.0 and mod.sim_beta.item() == 0.0
    if isinstance(mod, nn.Conv2d):  # PyTorch default: uniform in +-1/sqrt(fan_in)
      fan_in = mod.weight[0].numel()
      assert mod.weight.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
      assert mod.bias.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
  sd = m.state_dict()
  assert torch.all(sd["network.4.3.layer_scale_2"] == 1e-5)
  m2 = R.create_torch_model("fec_small", layer_scale_init_value=0.5)
  assert torch.all(m2.state_dict()["network.0.0.layer_scale_1"] == 0.5)


def test_drop_path_rates_and_semantics():
  m = R.create_torch_model("fec_small", drop_path_rate=0.1)
  rates = [
      blk.drop_path.drop_prob if isinstance(blk.drop_path, R.DropPath) else 0.0
      for s in (0, 2, 4, 6)
      for blk in m.network[s]
  ]
  assert len(rates) == 14
  assert rates == pytest.approx([0.1 * k / 13 for k in range(14)])
  dp = R.DropPath(0.5).train()
  torch.manual_seed(0)
  y = dp(torch.ones(64, 3, 2, 2))
  per_sample = y.reshape(64, -1)
  assert torch.all((per_sample == 0).all(1) | (per_sample == 2).all(1))
  assert 0 < (per_sample[:, 0] == 0).sum() < 64
  assert torch.equal(dp.eval()(torch.ones(2, 3)), torch.ones(2, 3))


def test_coordinate_channels():
  x = torch.zeros(1, 3, 5, 9)
  xc = R.FEC.add_coords(x)
  assert xc.shape == (1, 5, 5, 9)
  assert torch.allclose(xc[0, 3, :, 0], torch.arange(5) / 4.0 - 0.5)
  assert torch.allclose(xc[0, 3, 2, :], torch.zeros(9))
  assert torch.allclose(xc[0, 4, 0, :], torch.arange(9) / 8.0 - 0.5)


# ----------------------------------------------------------------------------
# Forward shapes and assignments
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(224, 224), (256, 320)])
def test_classification_shapes_and_assignments(small, hw):
  H, W = hw
  with torch.no_grad():
    y = small(torch.randn(2, 3, H, W))
  assert y.shape == (2, 1000) and torch.isfinite(y).all()
  names = [n for n, _ in small.assignments]
  expected_names = (
      [f"network.0.{j}.token_mixer" for j in range(3)]
      + ["network.1"]
      + [f"network.2.{j}.token_mixer" for j in range(4)]
      + ["network.3"]
      + [f"network.4.{j}.token_mixer" for j in range(5)]
      + ["network.5"]
      + [f"network.6.{j}.token_mixer" for j in range(2)]
  )
  assert names == expected_names
  sizes = {0: (H // 4, W // 4), 2: (H // 8, W // 8), 4: (H // 16, W // 16), 6: (H // 32, W // 32)}
  heads = {0: 4, 2: 4, 4: 8, 6: 8}
  centers = {0: 16, 2: 16, 4: 4, 6: 4}
  for name, a in small.assignments:
    assert a.dtype == torch.long
    parts = name.split(".")
    s = int(parts[1])
    if len(parts) == 4:  # Cluster
      h, w = sizes[s]
      assert a.shape == (2, heads[s], h, w)
      assert a.min() >= 0 and a.max() < centers[s]
    else:  # ClusterPool consumes the map of stage s-1
      h, w = sizes[s - 1]
      assert a.shape == (2, h, w)
      assert a.min() >= 0 and a.max() < (h // 2) * (w // 2)


def test_seg_shapes():
  torch.manual_seed(0)
  m = R.create_torch_model("fec_small_seg").eval()
  with torch.no_grad():
    outs = m(torch.randn(1, 3, 512, 512))
  assert isinstance(outs, list) and len(outs) == 4
  assert [tuple(o.shape) for o in outs] == [
      (1, 32, 128, 128),
      (1, 64, 64, 64),
      (1, 196, 32, 32),
      (1, 320, 16, 16),
  ]
  a = dict(m.assignments)
  assert a["network.0.0.token_mixer"].max() < 100 and a["network.4.0.token_mixer"].max() < 25
  # each fork output is its stage output through its own GroupNorm: zero mean per sample
  for o in outs:
    assert abs(o.mean().item()) < 1e-4


def test_det_shapes_and_fold_layout():
  torch.manual_seed(0)
  m = R.create_torch_model("fec_small_det").eval()
  with torch.no_grad():
    outs = m(torch.randn(1, 3, 320, 448))
  assert [tuple(o.shape) for o in outs] == [
      (1, 32, 80, 112),
      (1, 64, 40, 56),
      (1, 196, 20, 28),
      (1, 320, 10, 14),
  ]
  a = dict(m.assignments)
  M = 49
  # Cluster with fold 2 (stage 0, map 80x112, regions 40x56): value // M is the region index
  c0 = a["network.0.0.token_mixer"]
  assert c0.shape == (1, 4, 80, 112)
  region = (torch.arange(80)[:, None] // 40) * 2 + torch.arange(112)[None, :] // 56
  assert torch.equal(c0 // M, region.expand_as(c0))
  assert c0.max() < 4 * M
  # stage 2 has fold 1
  assert a["network.4.0.token_mixer"].max() < M
  # ClusterPool network.1 with fold 2: the center lies in the point's region of the output map
  p1 = a["network.1"]
  assert p1.shape == (1, 80, 112)
  row, col = p1 // 56, p1 % 56  # output map 40x56, regions 20x28
  assert torch.equal(row // 20, (torch.arange(80)[:, None] // 40).expand(1, 80, 112))
  assert torch.equal(col // 28, (torch.arange(112)[None, :] // 56).expand(1, 80, 112))
  # the pools take the fold of the stage they lead into (official: fold_w[i + 1]), so network.3
  # clusters its 40x56 map whole: points of the top-left quadrant join centers outside it
  assert [m.network[i].fold for i in (1, 3, 5)] == [2, 1, 1]
  p3 = a["network.3"]
  assert p3.shape == (1, 40, 56) and p3.max() < 20 * 28
  corner = p3[:, :20, :28]
  assert ((corner // 28 >= 10) | (corner % 28 >= 14)).any()
  assert a["network.5"].shape == (1, 20, 28) and a["network.5"].max() < 10 * 14


def test_errors():
  small = R.create_torch_model("fec_small")
  with pytest.raises(
      ValueError, match=r"network\.3.*25x25"
  ):  # 200 -> 50 -> 25 (odd) before network.3
    small(torch.randn(1, 3, 200, 200))
  det = R.create_torch_model("fec_small_det")
  with pytest.raises(
      ValueError, match=r"network\.0\.0\.token_mixer.*25x25.*fold 2"
  ):  # 100 -> 25, fold 2
    det(torch.randn(1, 3, 100, 100))
  with pytest.raises(
      ValueError, match=r"network\.1.*50x50"
  ):  # regions 25x25 are odd before network.1
    det(torch.randn(1, 3, 200, 200))


def test_batch_independence(small):
  x = torch.randn(2, 3, 64, 96)
  with torch.no_grad():
    y = small(x)
    a = [t.clone() for _, t in small.assignments]
    y1 = small(x[1:])
    a1 = [t for _, t in small.assignments]
  assert torch.allclose(y[1:], y1, atol=1e-5)
  assert all(torch.equal(t[1:], t1) for t, t1 in zip(a, a1))


# ----------------------------------------------------------------------------
# Gradients (doc §4)
# ----------------------------------------------------------------------------
def test_gradient_semantics():
  torch.manual_seed(0)
  m = R.create_torch_model("fec_small", num_classes=10, layer_scale_init_value=0.1).train()
  m(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
  for i in (1, 3, 5):
    pool = m.network[i]
    for p in (pool.conv_f.weight, pool.conv_f.bias):
      assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert pool.conv_v.weight.grad.abs().sum() > 0
    assert pool.conv_skip.weight.grad.abs().sum() > 0
  tm = m.network[0][0].token_mixer
  for p in (tm.f.weight, tm.v.weight, tm.sim_alpha, tm.sim_beta):
    assert p.grad is not None and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------
# Naive loop implementations straight from the document (doc §3)
# ----------------------------------------------------------------------------
def _windows(L, n):
  """PyTorch adaptive-pool windows: [floor(i*L/n), ceil((i+1)*L/n))."""
  return [((i * L) // n, -((-(i + 1) * L) // n)) for i in range(n)]


def _naive_centers(t, ch, cw):  # t [D, h, w] -> list of M vectors [D], row-major
  return [
      t[:, r0:r1, c0:c1].mean(dim=(1, 2))
      for r0, r1 in _windows(t.shape[1], ch)
      for c0, c1 in _windows(t.shape[2], cw)
  ]


def _cos(a, b):
  return (a / a.norm().clamp_min(1e-12)) @ (b / b.norm().clamp_min(1e-12))


def _naive_region(fe, va, ch, cw, score):
  """fe, va [D, h, w]; returns (out vectors per point dict, assign per point dict, reps list)."""
  fc, vc = _naive_centers(fe, ch, cw), _naive_centers(va, ch, cw)
  h, w = fe.shape[1:]
  assign, sims = {}, {}
  for y in range(h):
    for x in range(w):
      s = [score(c, fe[:, y, x]) for c in fc]
      vals = [float(v.detach()) for v in s]
      best = vals.index(max(vals))  # ties to the lowest index; a constant (no gradient)
      assign[y, x], sims[y, x] = best, s[best]
  reps = []
  for k in range(len(fc)):
    members = [va[:, y, x] for (y, x), a in assign.items() if a == k]
    total = torch.stack(members).sum(0) if members else torch.zeros_like(vc[k])
    reps.append((total + vc[k]) / (len(members) + 1))
  return assign, sims, reps


def naive_cluster(mod, x):
  B, _, H, W = x.shape
  E, D, f = mod.heads, mod.head_dim, mod.fold
  ch, cw = mod.centers
  h, w = H // f, W // f
  value, feat = mod.v(x), mod.f(x)
  out = x.new_zeros(B, E * D, H, W)
  assign = torch.zeros(B, E, H, W, dtype=torch.long)

  def score(c, p):
    return torch.sigmoid(mod.sim_beta[0] + mod.sim_alpha[0] * _cos(c, p))

  for b in range(B):
    for e in range(E):
      for r1 in range(f):
        for r2 in range(f):
          sl = (
              b,
              slice(e * D, (e + 1) * D),
              slice(r1 * h, (r1 + 1) * h),
              slice(r2 * w, (r2 + 1) * w),
          )
          a, s, reps = _naive_region(feat[sl], value[sl], ch, cw, score)
          for (y, xx), k in a.items():
            out[b, e * D : (e + 1) * D, r1 * h + y, r2 * w + xx] = reps[k] * s[y, xx]
            assign[b, e, r1 * h + y, r2 * w + xx] = (r1 * f + r2) * ch * cw + k
  return mod.proj(out), assign


def naive_pool(mod, x):
  B, _, H, W = x.shape
  f = mod.fold
  h, w = H // f, W // f
  value, feat = mod.conv_v(x), mod.conv_f(x)
  C = value.shape[1]
  reps_map = x.new_zeros(B, C, H // 2, W // 2)
  assign = torch.zeros(B, H, W, dtype=torch.long)
  for b in range(B):
    for r1 in range(f):
      for r2 in range(f):
        sl = (b, slice(None), slice(r1 * h, (r1 + 1) * h), slice(r2 * w, (r2 + 1) * w))
        a, _, reps = _naive_region(feat[sl], value[sl], h // 2, w // 2, _cos)
        for k, r in enumerate(reps):
          i, j = divmod(k, w // 2)
          reps_map[b, :, r1 * h // 2 + i, r2 * w // 2 + j] = r
        for (y, xx), k in a.items():
          i, j = divmod(k, w // 2)
          assign[b, r1 * h + y, r2 * w + xx] = (r1 * h // 2 + i) * (W // 2) + r2 * w // 2 + j
  return mod.conv_skip(x) + mod.norm2(reps_map), assign


def _grads(mod):
  return {
      n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
      for n, p in mod.named_parameters()
  }


@pytest.mark.parametrize("fold_,hw,centers", [(1, (5, 7), (2, 3)), (2, (8, 6), (3, 2))])
def test_cluster_matches_naive(fold_, hw, centers):
  torch.manual_seed(1)
  mod = R.Cluster(dim=6, heads=2, head_dim=3, centers=centers, fold_=fold_).double()
  with torch.no_grad():
    mod.sim_alpha.fill_(1.7)
    mod.sim_beta.fill_(-0.3)
  x = torch.randn(2, 6, *hw, dtype=torch.double)
  _assert_matches_naive(mod, naive_cluster, x, torch.randn(2, 6, *hw, dtype=torch.double))


@pytest.mark.parametrize("fold_,hw", [(1, (6, 4)), (2, (8, 12))])
def test_cluster_pool_matches_naive(fold_, hw):
  torch.manual_seed(2)
  mod = R.ClusterPool(5, 7, fold_).double()
  with torch.no_grad():
    mod.norm2.weight.normal_()
    mod.norm2.bias.normal_()
  x = torch.randn(2, 5, *hw, dtype=torch.double)
  g = torch.randn(2, 7, hw[0] // 2, hw[1] // 2, dtype=torch.double)
  grads = _assert_matches_naive(mod, naive_pool, x, g)
  assert torch.count_nonzero(grads["conv_f.weight"]) == 0


def _assert_matches_naive(mod, naive, x, g):
  """Outputs, assignments and parameter gradients of mod equal those of the loop version."""
  y = mod(x)
  (y * g).sum().backward()
  gy = _grads(mod)
  mod.zero_grad(set_to_none=True)
  yn, an = naive(mod, x)
  (yn * g).sum().backward()
  gn = _grads(mod)
  assert torch.equal(mod.last_assignment, an)
  assert torch.allclose(y, yn, atol=1e-10)
  for n in gy:
    assert torch.allclose(gy[n], gn[n], atol=1e-10), n
  return gy


def test_ties_go_to_lowest_index():
  torch.manual_seed(3)
  pool = R.ClusterPool(4, 4, fold_=2)
  cl = R.Cluster(4, heads=2, head_dim=2, centers=(3, 3), fold_=1)
  with torch.no_grad():
    for conv in (pool.conv_f, cl.f):  # constant features: every center ties
      conv.weight.zero_()
      conv.bias.fill_(1.0)
    x = torch.randn(1, 4, 8, 8)
    pool(x)
    cl(x)
  # pool fold 2: output 4x4, regions 2x2; lowest center of region (r1, r2) is (2*r1, 2*r2)
  first = torch.tensor([[0, 2], [8, 10]])
  expected = first.repeat_interleave(4, 0).repeat_interleave(4, 1)
  assert torch.equal(pool.last_assignment[0], expected)
  assert torch.count_nonzero(cl.last_assignment) == 0


def test_adaptive_pool_windows_overlap():
  # the reference uses F.adaptive_avg_pool2d; check it has the documented windows
  # (7 -> 2: [0,4), [3,7))
  assert _windows(7, 2) == [(0, 4), (3, 7)]
  t = torch.arange(7.0).reshape(1, 1, 7, 1)
  out = torch.nn.functional.adaptive_avg_pool2d(t, (2, 1)).flatten()
  assert torch.equal(out, torch.tensor([1.5, 4.5]))
