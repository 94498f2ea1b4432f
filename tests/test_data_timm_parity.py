"""Op-by-op agreement of fec_jax.data with timm's own code, given the same random draws.

timm's package __init__ needs torchvision; its auto_augment.py, random_erasing.py and
mixup.py do not, so they are loaded as files from an installed timm (`pip install
--no-deps timm`) without importing the package. Both implementations are driven by one
scripted stream of uniforms (`Script`): each draw (random, uniform, randint/integers,
choice, gauss/normal, beta) consumes the next value, mapped the same way on both sides.
Images must agree exactly (PIL ops) or to 1e-6 (float ops).
"""

import importlib.util
import math
import os
import types

import jax
import numpy as np
import pytest
from PIL import Image

from fec_jax.data import device_transforms, randaugment, transforms

torch = pytest.importorskip("torch", reason="timm parity needs torch (CPU is enough)")


def _load_timm(module: str):
  spec = importlib.util.find_spec("timm")
  if spec is None:
    pytest.skip(
        "timm not installed (pip install --no-deps timm==1.0.31): timm parity tests skipped"
    )
  path = os.path.join(spec.submodule_search_locations[0], "data", f"{module}.py")
  mod_spec = importlib.util.spec_from_file_location(f"_timm_{module}", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod


class Script:
  """One stream of uniforms in [0, 1), consumed by both the numpy-style rng (ours) and
  the Python `random`-style module (timm), with the same mapping per kind of draw."""

  def __init__(self, values):
    self._values = list(values)

  def _u(self):
    return self._values.pop(0)

  # numpy Generator interface (fec_jax.data)
  def random(self):
    return self._u()

  def uniform(self, a, b):
    return a + self._u() * (b - a)

  def integers(self, low, high, size=None):
    if size is None:
      return low + int(self._u() * (high - low))
    return np.array([low + int(self._u() * (high - low)) for _ in range(size)])

  def normal(self, mean, std):
    return mean + std * (4.0 * self._u() - 2.0)

  def standard_normal(self, shape, dtype):  # erasing noise: not scripted, not compared
    return np.random.default_rng(0).standard_normal(shape).astype(dtype) + 10.0

  # Python random interface (timm)
  def randint(self, a, b):
    return a + int(self._u() * (b - a + 1))

  def choice(self, seq, size=None, replace=True, p=None):
    if size is None:
      return seq[int(self._u() * len(seq))]
    return [seq[int(self._u() * len(seq))] for _ in range(size)]

  def gauss(self, mean, std):
    return self.normal(mean, std)


def _image(seed=0, size=(56, 48)):
  rng = np.random.default_rng(seed)
  low = rng.integers(0, 256, (size[0] // 4, size[1] // 4, 3), dtype=np.uint8)
  img = Image.fromarray(low).resize((size[1], size[0]), Image.Resampling.BICUBIC)
  return img


@pytest.fixture(scope="module")
def timm_aa():
  return _load_timm("auto_augment")


def _run_timm_op(timm_aa, monkeypatch, name, magnitude, values, hparams):
  monkeypatch.setattr(timm_aa, "random", Script(values))
  op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
  try:
    return op(_image())
  except ValueError:  # Pillow >= 13 rejects posterize(bits=0); older Pillow gave black
    assert "Posterize" in name
    return Image.new("RGB", _image().size)


@pytest.mark.parametrize(
    "name", randaugment.INCREASING_OPS + ("Posterize", "Solarize", "Color", "Contrast")
)
@pytest.mark.parametrize("magnitude", [0, 3, 9, 10])
def test_randaugment_op_matches_timm(timm_aa, monkeypatch, name, magnitude):
  """Each op at fixed magnitude, for both signs and both random resample filters."""
  hp_timm = {"translate_const": 100, "img_mean": (124, 116, 104)}
  hp_ours = randaugment.hparams_for(transforms.IMAGENET_MEAN)
  spec = randaugment.RandAugmentSpec(magnitude=magnitude, prob=1.0)
  for sign_u in (0.2, 0.8):
    for resample_u in (0.1, 0.9):
      values = [sign_u, resample_u]
      want = _run_timm_op(timm_aa, monkeypatch, name, magnitude, values, hp_timm)
      got = randaugment.augment_op(Script(values), _image(), name, spec, hp_ours)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


def test_fill_colour_is_timm_img_mean():
  assert randaugment.hparams_for(transforms.IMAGENET_MEAN)["fill"] == tuple(
      min(255, round(255 * x)) for x in transforms.IMAGENET_MEAN
  )


def test_rand_augment_chain_matches_timm(timm_aa, monkeypatch):
  """The full 'rand-m9-mstd0.5-inc1' transform: op choice, 0.5 gates, noisy magnitude."""
  hp_timm = {"translate_const": 100, "img_mean": (124, 116, 104)}
  spec = randaugment.parse("rand-m9-mstd0.5-inc1")
  hp_ours = randaugment.hparams_for(transforms.IMAGENET_MEAN)
  timm_ra = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(hp_timm))
  assert [op.name for op in timm_ra.ops] == list(spec.ops)
  assert (
      timm_ra.num_layers,
      timm_ra.ops[0].prob,
      timm_ra.ops[0].magnitude,
      timm_ra.ops[0].magnitude_std,
  ) == (spec.num_layers, spec.prob, spec.magnitude, spec.magnitude_std)
  rng = np.random.default_rng(1)
  for trial in range(60):
    values = list(rng.random(12))
    script = Script(values)
    monkeypatch.setattr(timm_aa, "random", script)
    monkeypatch.setattr(timm_aa, "np", types.SimpleNamespace(random=script))
    try:
      want = timm_ra(_image(trial))
    except ValueError:  # posterize(bits=0) on Pillow >= 13, see _run_timm_op
      continue
    got = randaugment.rand_augment(Script(values), _image(trial), spec, hp_ours)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(trial))


@pytest.mark.parametrize(
    "config_str",
    ["rand-m9-mstd0.5-inc1", "rand-m7-n3-p0.7", "rand-m10-mstd101-inc0", "rand-m5-mmax12-inc1"],
)
def test_parse_matches_timm(timm_aa, config_str):
  timm_ra = timm_aa.rand_augment_transform(config_str, {})
  spec = randaugment.parse(config_str)
  op = timm_ra.ops[0]
  assert [o.name for o in timm_ra.ops] == list(spec.ops)
  assert timm_ra.num_layers == spec.num_layers
  assert (op.prob, op.magnitude, op.magnitude_std) == (
      spec.prob,
      spec.magnitude,
      spec.magnitude_std,
  )
  assert (op.magnitude_max or 10.0) == spec.magnitude_max


def test_random_erasing_matches_timm(monkeypatch):
  """Same draws: the host box (erase_params) and the device fill (device_transforms.erase)
  give timm's result exactly in mode 'const' and erase exactly timm's region in 'pixel'."""
  timm_re = _load_timm("random_erasing")
  erase = jax.jit(device_transforms.erase, static_argnums=3)
  rng = np.random.default_rng(2)
  erased = 0
  for trial in range(40):
    values = list(rng.random(25))
    x = rng.standard_normal((3, 40, 52)).astype(np.float32)
    box = transforms.erase_params(Script(values), 40, 52, 0.6)
    erased += int(box[2] > 0)
    for mode in ("const", "pixel"):
      monkeypatch.setattr(timm_re, "random", Script(values))
      timm_erase = timm_re.RandomErasing(0.6, mode=mode, device="cpu")
      want = timm_erase(torch.from_numpy(x.copy())).numpy().transpose(1, 2, 0)
      got = np.asarray(erase(jax.random.key(trial), x.transpose(1, 2, 0)[None], box[None], mode))[0]
      changed_want = np.any(want != x.transpose(1, 2, 0), axis=-1)
      changed_got = np.any(got != x.transpose(1, 2, 0), axis=-1)
      np.testing.assert_array_equal(changed_got, changed_want)
      if mode == "const":
        np.testing.assert_array_equal(got, want)
  assert 10 < erased < 35  # both outcomes of the 0.6 gate were exercised


def _timm_rrc_params(width, height, scale, ratio, script):
  """timm RandomResizedCropAndInterpolation.get_params, copied verbatim but for
  F.get_image_size (timm's transforms.py imports torchvision, which may not import)."""
  random = script
  img_w, img_h = width, height
  area = img_w * img_h
  for _ in range(10):
    target_area = random.uniform(*scale) * area
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect_ratio = math.exp(random.uniform(*log_ratio))
    target_w = int(round(math.sqrt(target_area * aspect_ratio)))
    target_h = int(round(math.sqrt(target_area / aspect_ratio)))
    if target_w <= img_w and target_h <= img_h:
      i = random.randint(0, img_h - target_h)
      j = random.randint(0, img_w - target_w)
      return i, j, target_h, target_w
  in_ratio = img_w / img_h
  if in_ratio < min(ratio):
    target_w = img_w
    target_h = int(round(target_w / min(ratio)))
  elif in_ratio > max(ratio):
    target_h = img_h
    target_w = int(round(target_h * max(ratio)))
  else:
    target_w = img_w
    target_h = img_h
  return (img_h - target_h) // 2, (img_w - target_w) // 2, target_h, target_w


def test_rrc_params_match_timm():
  """Against the real timm method when torchvision imports, else its verbatim copy."""
  try:
    import torchvision  # noqa: F401

    timm_tf = _load_timm("transforms")
    get_params = lambda w, h, s, r, script: timm_tf.RandomResizedCropAndInterpolation.get_params(
        Image.new("RGB", (w, h)), s, r
    )  # noqa: E731
    patch_target = timm_tf
  except ImportError:
    get_params, patch_target = _timm_rrc_params, None
  rng = np.random.default_rng(3)
  for w, h in ((500, 375), (375, 500), (64, 1000), (1000, 64), (224, 224)):
    for _ in range(50):
      values = list(rng.random(22))
      script = Script(values)
      if patch_target is not None:
        patch_target.random = script
      want = get_params(w, h, (0.08, 1.0), (3 / 4, 4 / 3), script)
      got = transforms.rrc_params(Script(values), w, h, (0.08, 1.0), (3 / 4, 4 / 3))
      assert got == want


@pytest.mark.parametrize(
    "use_cutmix,lam",
    [(False, 0.37), (False, 0.5), (True, 0.61), (True, 0.75), (True, 0.0), (False, 1.0)],
)
@pytest.mark.parametrize("fast_collate", [False, True])
def test_mixup_matches_timm(monkeypatch, fast_collate, use_cutmix, lam):
  """With mocked numpy draws, mix_with_params against timm's Mixup(mode='batch') on a float
  batch (1e-6), and against its FastCollateMixup, which the official training runs (its
  prefetcher is on), on a uint8 batch with Mixup's blend rounded (round_blend; exact).

  CutMix cases use even box sides: timm >= 1.0.10 ends the box at cy + (cut + 1) // 2,
  the timm the official code ran (< 1.0) at cy + cut // 2, which we keep; they differ
  by one row/column for odd sides (see fec_jax.data.mixup).
  """
  import jax.numpy as jnp
  from fec_jax.data import mixup

  timm_mixup = _load_timm("mixup")
  cy_u, cx_u = 0.3, 0.8
  b, c, h, w, k = 6, 3, 20, 24, 5
  rng = np.random.default_rng(4)
  if fast_collate:
    x = rng.integers(0, 256, (b, c, h, w), dtype=np.uint8)
  else:
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
  labels = rng.integers(0, k, b)
  draws = iter([0.0, 0.0 if use_cutmix else 0.99])  # apply; switch to CutMix or not
  monkeypatch.setattr(np.random, "rand", lambda: next(draws))
  monkeypatch.setattr(np.random, "beta", lambda a, b_: lam)
  monkeypatch.setattr(
      np.random,
      "randint",
      lambda lo, hi, size=None: lo + int((cy_u if hi == h else cx_u) * (hi - lo)),
  )
  settings = dict(
      mixup_alpha=0.8,
      cutmix_alpha=1.0,
      prob=1.0,
      switch_prob=0.5,
      mode="batch",
      label_smoothing=0.1,
      num_classes=k,
  )
  if fast_collate:
    mix = timm_mixup.FastCollateMixup(**settings)
    want_x, want_y = mix([(x[i], int(labels[i])) for i in range(b)])
  else:
    mix = timm_mixup.Mixup(**settings)
    want_x, want_y = mix(torch.from_numpy(x.copy()), torch.from_numpy(labels))
  got_x, got_y = mixup.mix_with_params(
      jnp.asarray(x.transpose(0, 2, 3, 1).astype(np.float32)),
      jnp.asarray(labels),
      k,
      lam,
      use_cutmix,
      int(cy_u * h),
      int(cx_u * w),
      0.1,
      round_blend=fast_collate,
  )
  want_x = want_x.numpy().transpose(0, 2, 3, 1)
  if fast_collate:
    np.testing.assert_array_equal(np.asarray(got_x), want_x)
  else:
    np.testing.assert_allclose(np.asarray(got_x), want_x, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_y), want_y.numpy(), atol=1e-6)
