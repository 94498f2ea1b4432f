"""Semantic FPN (fec_jax.fpn) against a PyTorch rendition of mmseg's (tests/torch_reference_fpn.py).

The reference's weights and BatchNorm running statistics are perturbed away from their init
(torch_reference_fpn.perturbed_segmenter),
converted with fec_jax.convert, and both run on the same images, as in tests/test_parity.py:
  fp64: assignments identical in every clustering layer, logits to FP64_RTOL (relative to the max)
  fp32: assignments identical up to the first layer that differs, where every differing point is a
        near-tie (test_parity.TIE_MARGIN); the logits compared when no point differs; the neck and
        head on the reference backbone's maps to FP32_RTOL
  train mode (dropout off): logits, and the running statistics BatchNorm updates, match torch
Every jitted function is compiled without XLA's backend optimizations: these are one-shot runs.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fec_jax
import torch_reference_fpn
from fec_jax import convert, fpn
from fec_jax.model import FAST_COMPILE, count_params, variable_shapes
from test_parity import TIE_MARGIN, assert_same_assignments, relative_error

FP64_RTOL = 1e-12
FP32_RTOL = 1e-5
NAME = "fpn_fec_small"


def compile_o0(fn, *args):
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def converted(torch_model, **overrides):
  state = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}  # no aliasing
  variables, overrides = convert.torch_to_variables(state, NAME, **overrides)
  return fec_jax.create_model(NAME, **overrides), variables


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def run_both(dtype, size=512):
  """One image through both models: (torch logits, torch assignments, margins, torch backbone
  maps, jax logits, jax assignments, jax model, variables), numpy NHWC."""
  torch_model = torch_reference_fpn.perturbed_segmenter(NAME, dtype)
  x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)
  with torch.no_grad():
    maps = torch_model.backbone(x)
    expected = torch_model.decode_head(torch_model.neck(maps))
  jax_dtype = jnp.float64 if dtype == torch.float64 else jnp.float32
  model, variables = converted(torch_model, dtype=jax_dtype)
  got, state = compile_o0(
      lambda v, im: model.apply(v, im, mutable=["intermediates"]), variables, jnp.asarray(nhwc(x))
  )
  backbone = torch_model.backbone
  return (
      nhwc(expected),
      {k: v.numpy() for k, v in backbone.assignments},
      {k: v.numpy() for k, v in backbone.margins},
      [nhwc(m) for m in maps],
      np.asarray(got),
      {
          k: np.asarray(v)
          for k, v in fec_jax.cluster_assignments(state["intermediates"]["backbone"]).items()
      },
      model,
      variables,
  )


def neck_and_head(model, variables, maps, train=False):
  """The JAX neck and head alone on given backbone maps: (logits, updated batch_stats)."""
  neck = fpn.FPN(dtype=model.dtype)
  head = fpn.FPNHead(model.num_classes, dropout_rate=0.0, dtype=model.dtype)
  params, stats = variables["params"], variables["batch_stats"]

  def apply(p, s, maps):
    feats = neck.apply({"params": p["neck"]}, maps)
    return head.apply(
        {"params": p["decode_head"], "batch_stats": s["decode_head"]},
        feats,
        train,
        mutable=["batch_stats"],
    )

  logits, updated = compile_o0(apply, params, stats, [jnp.asarray(m) for m in maps])
  return np.asarray(logits), updated["batch_stats"]


def test_parity_fp64_512():
  with jax.enable_x64(True):
    expected, ref_assign, _, _, got, jax_assign, _, _ = run_both(torch.float64)
  assert_same_assignments(ref_assign, jax_assign)
  assert got.shape == expected.shape == (1, 128, 128, 150)
  err = relative_error(expected, got)
  print(f"{NAME} 512x512 fp64: max |logit diff| / max |logit| = {err:.2e}")
  assert err <= FP64_RTOL


def test_parity_fp32_512():
  expected, ref_assign, margins, maps, got, jax_assign, model, variables = run_both(torch.float32)
  assert list(jax_assign) == list(ref_assign)
  flipped_layer = next((k for k in ref_assign if (ref_assign[k] != jax_assign[k]).any()), None)
  if flipped_layer is None:
    err = relative_error(expected, got)
    print(f"{NAME} 512x512 fp32: no assignment differs, logits relative error {err:.2e}")
    assert err <= 1e-4
  else:  # only near-ties may differ; everything downstream inherits the difference
    flipped = ref_assign[flipped_layer] != jax_assign[flipped_layer]
    print(
        f"{NAME} 512x512 fp32: first divergence in {flipped_layer}: {flipped.sum()} points, "
        f"reference margins {margins[flipped_layer][flipped].tolist()}"
    )
    assert margins[flipped_layer][flipped].max() <= TIE_MARGIN, "a non-tie point flipped"
  logits, _ = neck_and_head(model, variables, maps)  # the reference backbone's maps
  err = relative_error(expected, logits)
  print(f"{NAME} 512x512 fp32 neck + head on the reference maps: relative error {err:.2e}")
  assert err <= FP32_RTOL


def test_train_mode_batch_statistics_fp64():
  """BatchNorm in train mode: normalizes with the batch's statistics and updates the running ones
  (unbiased variance, momentum 0.1) as torch does; dropout off."""
  with jax.enable_x64(True):
    torch_model = torch_reference_fpn.perturbed_segmenter(NAME, torch.float64)
    model, variables = converted(torch_model, dtype=jnp.float64)
    g = torch.Generator().manual_seed(2)
    maps = [
        torch.randn(2, c, 128 // s, 96 // s, generator=g, dtype=torch.float64)
        for c, s in zip((32, 64, 196, 320), (4, 8, 16, 32))
    ]
    torch_model.train()
    torch_model.decode_head.dropout.p = 0.0
    expected = torch_model.decode_head(torch_model.neck(maps))
    got, stats = neck_and_head(model, variables, [nhwc(m) for m in maps], train=True)
  err = relative_error(nhwc(expected), got)
  assert err <= FP64_RTOL
  state = convert.variables_to_torch({"params": {}, "batch_stats": {"decode_head": stats}})
  before = convert.variables_to_torch({"params": {}, "batch_stats": variables["batch_stats"]})
  reference = torch_model.state_dict()
  assert len(state) == 3 * 7
  worst = 0.0
  for key, value in state.items():
    if key.endswith("num_batches_tracked"):
      continue
    e = reference[key].numpy()
    assert not np.allclose(e, before[key]), f"{key} did not move"
    np.testing.assert_allclose(value, e, rtol=1e-12, atol=0, err_msg=key)
    worst = max(worst, float(np.abs(value / e - 1).max()))
  print(f"train mode fp64: logits relative error {err:.2e}, running statistics {worst:.2e}")


def test_dropout_drops_whole_channels():
  """mmseg 0.24's cls_seg dropout is Dropout2d: one draw per (sample, channel), scaled by 1/keep."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  feats = [jax.random.normal(k, (8, 8 // s, 8 // s, 16)) for k, s in zip(keys, (1, 2, 4, 8))]
  head = fpn.FPNHead(5, channels=16, dropout_rate=0.5)
  variables = compile_o0(head.init, jax.random.PRNGKey(1), feats)

  def dropout_input_and_output(v):
    seen = []

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.module.name == "dropout":
        seen.append((args[0], out))
      return out

    with nn.intercept_methods(record):
      head.apply(v, feats, True, rngs={"dropout": jax.random.PRNGKey(2)}, mutable=["batch_stats"])
    return seen[0]  # [8, 8, 8, 16] each

  before, after = map(np.asarray, compile_o0(dropout_input_and_output, variables))
  channel_kept = (after != 0).any(axis=(1, 2), keepdims=True)  # [8, 1, 1, 16]
  np.testing.assert_allclose(after, 2 * before * channel_kept, rtol=1e-6)
  assert 0.3 < channel_kept.mean() < 0.7


def test_resize_is_mmseg_bilinear_without_antialiasing():
  """fpn.resize_bilinear == F.interpolate(bilinear, align_corners=False), up and down."""
  x = np.random.default_rng(0).standard_normal((2, 5, 12, 20))
  for size in ((48, 80), (37, 61), (5, 7)):
    expected = nhwc(
        F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False)
    )
    with jax.enable_x64(True):
      got = np.asarray(fpn.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), size))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13, err_msg=str(size))


class _PixelClassifier(nn.Module):
  """A stand-in segmenter for `predict`: logits at stride 4 from a 4x4 average and a Dense."""

  @nn.compact
  def __call__(self, images):
    b, h, w, c = images.shape
    pooled = images.reshape(b, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4))
    return nn.Dense(7)(pooled)


@pytest.mark.parametrize("out_hw", [(70, 45), (23, 11)])
def test_predict_is_mmseg_whole_inference(out_hw):
  """mmseg 0.24: encode_decode resizes the logits to the input size, whole_inference resizes that
  to the original size; argmax. The one-resize shortcut gives other labels on this input."""
  model = _PixelClassifier()
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  logits = torch.from_numpy(np.array(model.apply(variables, images)).transpose(0, 3, 1, 2))
  resize = lambda t, size: F.interpolate(t, size=size, mode="bilinear", align_corners=False)
  expected = resize(resize(logits, (64, 32)), out_hw).argmax(1).numpy()
  assert (resize(logits, out_hw).argmax(1).numpy() != expected).any()
  got = np.asarray(fpn.predict(model, variables, images, out_hw))
  assert got.dtype == np.int32 and got.shape == (2, *out_hw)
  np.testing.assert_array_equal(got, expected)


def test_predict_of_another_model_or_size_says_what_it_takes():
  # a classifier failed in resize_bilinear: "not enough values to unpack (expected 4, got 2)"
  images = jnp.zeros((1, 64, 64, 3))
  for name in ("fec_small", "fec_small_seg"):
    with pytest.raises(ValueError, match=f"takes a segmenter \\(fpn_fec_small, .*\\), got {name}$"):
      fpn.predict(fec_jax.create_model(name), {}, images, (64, 64))  # before the forward pass
  model = _PixelClassifier()
  with pytest.raises(ValueError, match=r"out_hw is \(h, w\), the size to predict at, got 64$"):
    fpn.predict(model, model.init(jax.random.PRNGKey(1), images), images, 64)


@pytest.mark.parametrize(
    "name,count",
    [("fpn_fec_small", 9_568_286), ("fpn_fec_base", 18_841_518), ("fpn_fec_large", 33_475_014)],
)
def test_parameter_counts(name, count):
  """The exact counts behind the paper's 9.1M / 18.0M / 31.9M (/ 2^20); BN statistics excluded."""
  variables = variable_shapes(fec_jax.create_model(name))
  assert count_params(variables["params"]) == count
  assert len(jax.tree.leaves(variables["batch_stats"])) == 2 * 7


def test_registry_and_options():
  assert {"fpn_fec_small", "fpn_fec_base", "fpn_fec_large"} <= set(fec_jax.list_models())
  model = fec_jax.create_model("fpn_fec_base", num_classes=19, dropout_rate=0.0)
  assert isinstance(model, fpn.SemanticFPN) and model.num_classes == 19
  assert model.variant == fec_jax.VARIANTS["fec_base_seg"]
  option = r"^1 unknown option \['num_class'\] for fpn_fec_small; .*; did you mean num_classes\?$"
  with pytest.raises(ValueError, match=option):
    fec_jax.create_model("fpn_fec_small", num_class=10)


def test_init_variables_follow_mmseg_init():
  """fec_jax.init_variables works for the segmenters: params and batch_stats (0 / 1), the neck's
  convs Xavier-uniform, the head's kaiming-normal (fan_out), conv_seg normal(0.01), biases 0."""
  model = fec_jax.create_model(NAME)
  variables = fec_jax.init_variables(model, jax.random.PRNGKey(0), (1, 64, 64, 3))
  assert set(variables) == {"params", "batch_stats"}
  for bn in variables["batch_stats"]["decode_head"].values():
    np.testing.assert_array_equal(bn["bn"]["mean"], 0.0)
    np.testing.assert_array_equal(bn["bn"]["var"], 1.0)
  neck, head = variables["params"]["neck"], variables["params"]["decode_head"]
  fpn_conv = np.asarray(neck["fpn_convs_0"]["conv"]["kernel"])  # [3, 3, 256, 256]
  bound = np.sqrt(6 / (2 * 9 * 256))
  assert np.abs(fpn_conv).max() <= bound and np.abs(fpn_conv).max() > 0.99 * bound
  np.testing.assert_array_equal(neck["lateral_convs_3"]["conv"]["bias"], 0.0)
  scale_conv = np.asarray(head["scale_heads_3_4"]["conv"]["kernel"])  # [3, 3, 128, 128]
  assert abs(scale_conv.std() - np.sqrt(2 / (9 * 128))) < 0.003
  assert "bias" not in head["scale_heads_3_4"]["conv"]
  assert abs(np.asarray(head["conv_seg"]["kernel"]).std() - 0.01) < 0.0005
  np.testing.assert_array_equal(head["scale_heads_0_0"]["bn"]["scale"], 1.0)
