"""The Flax model's API, input checks, initialization and building blocks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fec_jax
from fec_jax import model as fec_model
from fec_jax import summary
from fec_jax.model import FAST_COMPILE


def shapes(name, height, width, **overrides):
  model = fec_jax.create_model(name, **overrides)
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x)[0], images)


def test_registry():
  assert fec_jax.list_models() == sorted(
      [f"fec_{s}{k}" for s in ("small", "base", "large") for k in ("", "_seg", "_det")]
      + [f"fpn_fec_{s}" for s in ("small", "base", "large")]
  )
  with pytest.raises(ValueError, match="unknown model 'fec_tiny'"):
    fec_jax.create_model("fec_tiny")
  option = r"^1 unknown option \['num_class'\] for fec_small; .*; did you mean num_classes\?$"
  with pytest.raises(ValueError, match=option):
    fec_jax.create_model("fec_small", num_class=10)
  with pytest.raises(ValueError, match=r"aggregation must be one of \('auto', 'segment_sum'"):
    fec_jax.create_model("fec_small", aggregation="sum")  # at once, not at the first call
  with pytest.raises(ValueError, match="assign_grad must be one of"):
    fec_jax.create_model("fpn_fec_small", assign_grad="straight")
  # dtype="bf16" was taken, and init failed with numpy's "data type 'bf16' not understood"
  for dtype in ("bf16", jnp.int8):
    with pytest.raises(ValueError, match=rf"dtype must be a float dtype .*, got {dtype!r}$"):
      fec_jax.create_model("fec_small", dtype=dtype)
  assert fec_jax.create_model("fpn_fec_small", dtype="bfloat16").dtype == "bfloat16"


@pytest.mark.parametrize(
    "name,height,width,expected",
    [
        ("fec_small", 224, 224, (1, 1000)),
        ("fec_small", 256, 320, (1, 1000)),
        (
            "fec_base_seg",
            512,
            512,
            [(1, 128, 128, 64), (1, 64, 64, 128), (1, 32, 32, 320), (1, 16, 16, 512)],
        ),
        (
            "fec_large_det",
            320,
            448,
            [(1, 80, 112, 64), (1, 40, 56, 128), (1, 20, 28, 320), (1, 10, 14, 512)],
        ),
    ],
)
def test_output_shapes(name, height, width, expected):
  out = shapes(name, height, width)
  got = [o.shape for o in out] if isinstance(out, list) else out.shape
  assert got == expected


def test_variable_shapes_are_traced_once_per_model_and_each_call_owns_its_dicts(monkeypatch):
  traced = []  # the models whose init was traced
  eval_shape = jax.eval_shape

  def counted(fun, *args, **kwargs):
    if getattr(fun, "__name__", None) == "init":
      traced.append(fun.__self__)
    return eval_shape(fun, *args, **kwargs)

  monkeypatch.setattr(jax, "eval_shape", counted)
  first = fec_model.variable_shapes(fec_model.create_model("fec_small", num_classes=7))
  again = fec_model.variable_shapes(fec_model.create_model("fec_small", num_classes=7))
  assert len(traced) == 1 and again == first
  first["params"]["head"]["kernel"] = None
  assert again["params"]["head"]["kernel"].shape[-1] == 7  # no caller changes another's
  # A module with a list among its fields (not hashable) is traced every time.
  small = fec_model.VARIANTS["fec_small"]
  variant = dataclasses.replace(small, depths=list(small.depths))
  listed = fec_model.variable_shapes(fec_model.FEC(variant, num_classes=7))
  assert len(traced) == 2 and listed == again


def test_odd_map_before_a_pool_names_the_layer():
  # 200 -> 50 -> 25 at stage 1: the official code crashes in network.3
  with pytest.raises(
      ValueError, match=r"network\.3: ClusterPool needs an even feature map .* 25x25"
  ):
    shapes("fec_small", 200, 200)


def test_fold_that_does_not_divide_names_the_layer():
  with pytest.raises(
      ValueError, match=r"network\.0\.\*\.token_mixer: feature map 25x25 .* 2x2 fold"
  ):
    shapes("fec_small_det", 100, 100)


def test_nchw_input_gets_a_hint():
  model = fec_jax.create_model("fec_small")
  with pytest.raises(ValueError, match="NCHW: transpose to NHWC"):
    jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 3, 64, 64), jnp.float32)
    )


@pytest.mark.parametrize("name", ["fec_small", "fpn_fec_small"])
def test_integer_images_are_refused(name):
  # uint8 pixels ran as values 0..255: logits of an unnormalized image, without a word
  model = fec_jax.create_model(name)
  with pytest.raises(ValueError, match="float images normalized .* got uint8: .*normalize"):
    jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
    )


def test_cluster_assignments_of_a_segmenter_are_its_backbones():
  # the segmenter's whole state failed with "invalid literal for int() ... 'network'"
  def assignments(name):
    model = fec_jax.create_model(name)

    def run(images):
      state = model.apply(
          model.init(jax.random.PRNGKey(0), images), images, mutable=["intermediates"]
      )[1]
      return fec_jax.cluster_assignments(state)

    return jax.eval_shape(run, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))

  segmenter = assignments("fpn_fec_small")
  assert segmenter == assignments("fec_small_seg")
  assert segmenter["network.1"].shape == (1, 16, 16) and "network.6.1.token_mixer" in segmenter


def test_cluster_assignments_of_anything_but_the_sown_state_say_what_to_give():
  # the variables gave {} without a word, apply's (logits, state) tuple an AttributeError
  model = fec_jax.create_model("fec_small")

  def run(images):
    variables = model.init(jax.random.PRNGKey(0), images)
    with pytest.raises(ValueError, match=r"no assignment in a dict of \['params'\]; expected"):
      fec_jax.cluster_assignments(variables)
    with pytest.raises(TypeError, match=r"takes the state of model.apply.* got a tuple"):
      fec_jax.cluster_assignments(model.apply(variables, images, mutable=["intermediates"]))

  jax.eval_shape(run, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


@pytest.fixture(scope="module")
def small_init():
  model = fec_jax.create_model("fec_small")
  return fec_jax.init_variables(model, jax.random.PRNGKey(0), (1, 64, 64, 3))["params"]


def test_official_initialization(small_init):
  """docs/official-code.md Sec. 5."""
  p = small_init
  block = jax.tree.map(lambda a: a[0], p["network_0"])  # block 0 of stage 0
  np.testing.assert_array_equal(block["layer_scale_1"], np.float32(1e-5))
  np.testing.assert_array_equal(block["token_mixer"]["sim_alpha"], 1.0)
  np.testing.assert_array_equal(block["token_mixer"]["sim_beta"], 0.0)
  np.testing.assert_array_equal(block["norm1"]["scale"], 1.0)
  np.testing.assert_array_equal(block["mlp"]["fc1"]["bias"], 0.0)
  fc1 = np.asarray(p["network_4"]["mlp"]["fc1"]["kernel"][0])  # 196 x 784 draws
  assert abs(fc1.std() - 0.02) < 0.001 and np.abs(fc1).max() > 0.04  # normal, not cut at 2 std
  for kernel, bias, fan_in in [
      (block["token_mixer"]["f"]["kernel"], block["token_mixer"]["f"]["bias"], 32),
      (p["network_1"]["conv_skip"]["kernel"], p["network_1"]["conv_skip"]["bias"], 9 * 32),
      (p["patch_embed"]["proj"]["kernel"], p["patch_embed"]["proj"]["bias"], 80),
  ]:
    bound = 1 / np.sqrt(fan_in)
    for t in (np.asarray(kernel), np.asarray(bias)):
      assert np.abs(t).max() <= bound and np.abs(t).max() > 0.8 * bound  # uniform(+-1/sqrt(fan_in))


def test_assignments_are_sown_for_every_clustering_layer(small_init):
  model = fec_jax.create_model("fec_small")
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
  _, state = apply(small_init, jnp.ones((2, 64, 64, 3)))
  assignments = fec_jax.cluster_assignments(state)
  names = list(assignments)
  assert names[:4] == [f"network.0.{j}.token_mixer" for j in range(3)] + ["network.1"]
  assert len(names) == 14 + 3
  assert assignments["network.1"].shape == (2, 16, 16)
  assert int(assignments["network.1"].max()) < 8 * 8
  assert assignments["network.2.0.token_mixer"].shape == (2, 4, 8, 8)
  assert int(assignments["network.2.0.token_mixer"].max()) < 16


def test_drop_path_drops_whole_samples_and_rescales():
  layer = fec_model.DropPath()
  x = jnp.ones((512, 2, 2, 3))
  rngs = {"dropout": jax.random.PRNGKey(0)}
  y = np.asarray(layer.apply({}, x, 0.5, rngs=rngs))
  per_sample = y.reshape(512, -1)
  assert set(np.unique(per_sample)) == {0.0, 2.0}
  assert (per_sample.min(1) == per_sample.max(1)).all()  # a sample is dropped as a whole
  assert 0.4 < (per_sample[:, 0] == 0).mean() < 0.6
  np.testing.assert_array_equal(layer.apply({}, x, 0.0, rngs=rngs), x)  # the first block's rate


def test_stage_scan_gives_each_block_its_drop_path_rate(small_init):
  """Stochastic depth rises linearly over the 14 blocks (timm's rule), each block with its own
  draws: with rate 0.5 and 64 samples, block 0 drops none, the last block about half."""
  model = fec_jax.create_model("fec_small", drop_path_rate=0.5)
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 64, 64, 3))

  @jax.jit
  def drop_path_outputs(params):
    _, state = model.apply(
        {"params": params},
        x,
        train=True,
        rngs={"dropout": jax.random.PRNGKey(2)},
        capture_intermediates=lambda mdl, _: isinstance(mdl, fec_model.DropPath),
        mutable=["intermediates"],
    )
    return {
        s: state["intermediates"][s]["DropPath_0"]["__call__"] for s in ("network_0", "network_6")
    }

  outputs = drop_path_outputs(small_init)
  dropped = lambda y: np.asarray((y == 0).reshape(*y.shape[:2], -1).all(-1))  # [blocks, B]
  first, last = dropped(outputs["network_0"][0]), dropped(outputs["network_6"][1])
  assert first.shape == (3, 64) and last.shape == (2, 64)
  assert not first[0].any()  # rate 0
  assert 16 < last[1].sum() < 48  # rate 0.5
  assert not np.array_equal(last[0], last[1])  # the blocks draw independently


def test_unrolled_stages_compute_the_same(small_init):
  """unroll_stages (for XLA's cost analysis) takes the same params and gives the same clusters."""
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 64, 64, 3))
  outputs = []
  for unroll in (False, True):
    model = fec_jax.create_model("fec_small", unroll_stages=unroll)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
    logits, state = apply(small_init, x)
    outputs.append((np.asarray(logits), fec_jax.cluster_assignments(state)))
  (scanned, a), (unrolled, b) = outputs
  assert a.keys() == b.keys() and len(a) == 17
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  np.testing.assert_allclose(unrolled, scanned, rtol=0, atol=1e-5 * np.abs(scanned).max())


def test_bf16_compute_keeps_fp32_params_and_clustering(small_init):
  model = fec_jax.create_model("fec_small", dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  logits = jax.jit(model.apply)({"params": small_init}, x)
  reference = jax.jit(fec_jax.create_model("fec_small").apply)({"params": small_init}, x)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  assert (
      np.abs(np.asarray(logits) - np.asarray(reference)).max()
      < 0.05 * np.abs(reference).max() + 1e-3
  )


def test_summary_reports_macs_close_to_the_paper():
  params = fec_model.param_shapes(fec_jax.create_model("fec_small"))
  assert fec_model.count_params(params) == 5_727_528
  assert 1.3e9 < summary.macs_per_image("fec_small") < 1.7e9  # paper: 1.4 GFLOPs (MACs)


def test_aggregation_paths_and_straight_through_at_model_level(small_init):
  """segment_sum and onehot: same logits and gradients; straight_through: same logits, and
  gradient reaches ClusterPool's conv_f (which the official semantics leave at exactly zero)."""
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 64, 64, 3))

  def logits_and_grads(**overrides):
    model = fec_jax.create_model("fec_small", **overrides)
    loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
    fn = jax.jit(lambda p: (model.apply({"params": p}, x), jax.grad(loss)(p)))
    # Compiled without LLVM optimizations: this small program's cost is all compile time.
    return fn.lower(small_init).compile(FAST_COMPILE)(small_init)

  seg_logits, seg_grads = logits_and_grads(aggregation="segment_sum")
  hot_logits, hot_grads = logits_and_grads(aggregation="onehot")
  st_logits, st_grads = logits_and_grads(assign_grad="straight_through")
  np.testing.assert_allclose(hot_logits, seg_logits, rtol=1e-5, atol=1e-6)
  for g_seg, g_hot in zip(jax.tree.leaves(seg_grads), jax.tree.leaves(hot_grads)):
    np.testing.assert_allclose(
        g_hot, g_seg, rtol=1e-4, atol=1e-6 * float(np.abs(g_seg).max()) + 1e-12
    )
  np.testing.assert_array_equal(st_logits, seg_logits)
  for pool in ("network_1", "network_3", "network_5"):
    assert not np.asarray(seg_grads[pool]["conv_f"]["kernel"]).any()
    assert np.abs(np.asarray(st_grads[pool]["conv_f"]["kernel"])).max() > 0
