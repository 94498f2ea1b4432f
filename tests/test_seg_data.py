"""Segmentation data: ops against NumPy/cv2 renditions of mmseg 0.24, the ADE20K source and
the loader (determinism, resume, host sharding, bad files), the synthetic demo."""

import io
import json
import logging
import os
import re

import cv2
import grain
import jax
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import fec_jax.data as fd
from fec_jax.data import (
    loader,
    seg_device_transforms,
    seg_pipeline,
    seg_sources,
    seg_transforms,
    transforms,
)
from ade20k_fixture import make_ade20k_folder


class LegacyRandom:
  """The numpy.random calls mmseg makes, drawn from a np.random.Generator, so that an mmseg
  rendition and our ops can consume one stream of draws."""

  def __init__(self, seed):
    self.gen = np.random.default_rng(seed)

  def random_sample(self):
    return self.gen.random()

  rand = random_sample

  def randint(self, low, high=None):
    return self.gen.integers(low) if high is None else self.gen.integers(low, high)

  def uniform(self, low, high):
    return self.gen.uniform(low, high)


# ---- mmseg 0.24 / mmcv renditions (numpy, cv2; BGR images as mmseg has them) ----


def mmcv_rescale_size(old_size, scale):
  w, h = old_size
  scale_factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)


def mmcv_imrescale(img, scale, interpolation="bilinear"):
  h, w = img.shape[:2]
  codes = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
  return cv2.resize(img, mmcv_rescale_size((w, h), scale), interpolation=codes[interpolation])


def mmseg_load_annotations(gt):
  gt = gt.copy()
  gt[gt == 0] = 255
  gt = gt - 1
  gt[gt == 254] = 255
  return gt


def mmseg_resize(random, results, img_scale, ratio_range):
  ratio = random.random_sample() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
  scale = int(img_scale[0] * ratio), int(img_scale[1] * ratio)
  results["img"] = mmcv_imrescale(results["img"], scale)
  results["gt"] = mmcv_imrescale(results["gt"], scale, interpolation="nearest")


def mmseg_random_crop(random, results, crop_size, cat_max_ratio, ignore_index=255):
  def get_crop_bbox(img):
    margin_h = max(img.shape[0] - crop_size[0], 0)
    margin_w = max(img.shape[1] - crop_size[1], 0)
    offset_h = random.randint(0, margin_h + 1)
    offset_w = random.randint(0, margin_w + 1)
    return offset_h, offset_h + crop_size[0], offset_w, offset_w + crop_size[1]

  def crop(img, bbox):
    return img[bbox[0] : bbox[1], bbox[2] : bbox[3], ...]

  img = results["img"]
  bbox = get_crop_bbox(img)
  draws = 1
  if cat_max_ratio < 1.0:
    for _ in range(10):
      seg_temp = crop(results["gt"], bbox)
      labels, cnt = np.unique(seg_temp, return_counts=True)
      cnt = cnt[labels != ignore_index]
      if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
        break
      bbox = get_crop_bbox(img)
      draws += 1
  results["img"], results["gt"] = crop(img, bbox), crop(results["gt"], bbox)
  return draws


def mmseg_random_flip(random, results, prob):
  if random.rand() < prob:
    results["img"] = np.flip(results["img"], axis=1)
    results["gt"] = np.flip(results["gt"], axis=1).copy()


def mmseg_photometric(
    random,
    img,
    brightness_delta=32,
    contrast_range=(0.5, 1.5),
    saturation_range=(0.5, 1.5),
    hue_delta=18,
):
  def convert(img, alpha=1, beta=0):
    img = img.astype(np.float32) * alpha + beta
    img = np.clip(img, 0, 255)
    return img.astype(np.uint8)

  def contrast(img):
    if random.randint(2):
      return convert(img, alpha=random.uniform(*contrast_range))
    return img

  if random.randint(2):
    img = convert(img, beta=random.uniform(-brightness_delta, brightness_delta))
  mode = random.randint(2)
  if mode == 1:
    img = contrast(img)
  if random.randint(2):
    img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    img[:, :, 1] = convert(img[:, :, 1], alpha=random.uniform(*saturation_range))
    img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
  if random.randint(2):
    img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-hue_delta, hue_delta)) % 180
    img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
  if mode == 0:
    img = contrast(img)
  return img


def mmseg_normalize_pad(img_bgr, gt, size, mean, std):
  """Normalize(to_rgb=True) (mmcv.imnormalize, float32) then Pad(size, 0, seg_pad_val=255)."""
  img = cv2.cvtColor(img_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
  img = (img - np.float64(mean) * 255) / (np.float64(std) * 255)
  img = img.astype(np.float32)
  h, w = gt.shape
  img = np.pad(img, ((0, size[0] - h), (0, size[1] - w), (0, 0)), constant_values=0)
  gt = np.pad(gt, ((0, size[0] - h), (0, size[1] - w)), constant_values=255)
  return img, gt


def authors_align_resize(img, img_scale, size_divisor):
  img = mmcv_imrescale(img, img_scale)
  align_h = int(np.ceil(img.shape[0] / size_divisor)) * size_divisor
  align_w = int(np.ceil(img.shape[1] / size_divisor)) * size_divisor
  return cv2.resize(img, (align_w, align_h), interpolation=cv2.INTER_LINEAR)


# ---- helpers ----


def _random_image(rng, h, w):
  low = rng.integers(0, 256, (max(h // 6, 1), max(w // 6, 1), 3), dtype=np.uint8)
  img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
  return np.clip(img + rng.normal(0, 15, img.shape), 0, 255).astype(np.uint8)


def _blocky_label(rng, h, w, num_classes=6, block=16, dominant=0.0):
  """Labels in 0..num_classes-1 plus some 255; with `dominant`, that share is class 0."""
  blocks = rng.integers(0, num_classes, (-(-h // block), -(-w // block)))
  blocks[rng.random(blocks.shape) < dominant] = 0
  blocks[rng.random(blocks.shape) < 0.05] = 255
  return np.kron(blocks, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


def _cfg(root, **kw):
  cfg = fd.ade20k_config()
  cfg.root, cfg.num_classes, cfg.num_workers = str(root), 5, 0
  cfg.img_scale, cfg.crop_size = (96, 48), (32, 32)
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
  return make_ade20k_folder(tmp_path_factory.mktemp("ade"), num_train=10, num_val=5)


def _take(it, n):
  return [next(it) for _ in range(n)]


# ---- op tests ----


def test_reduce_zero_label_matches_mmseg():
  label = np.arange(256, dtype=np.uint8).reshape(16, 16)
  np.testing.assert_array_equal(
      seg_transforms.reduce_zero_label(label), mmseg_load_annotations(label)
  )
  assert seg_transforms.reduce_zero_label(np.array([[0, 1, 150]], np.uint8)).tolist() == [
      [255, 0, 149]
  ]


def test_ratio_resize_matches_mmseg():
  """Random ratio, keep-ratio scale factor and rounding, cv2 bilinear image, nearest label."""
  rng = np.random.default_rng(0)
  for seed, (h, w) in enumerate([(333, 500), (500, 375), (512, 683), (37, 91), (1200, 300)]):
    img, gt = _random_image(rng, h, w), _blocky_label(rng, h, w)
    ours, theirs = np.random.default_rng(seed), LegacyRandom(seed)
    scale = seg_transforms.random_scale(ours, (2048, 512), (0.5, 2.0))
    got_img, got_gt = seg_transforms.rescale(img, gt, scale)
    results = {"img": img[..., ::-1].copy(), "gt": gt}
    mmseg_resize(theirs, results, (2048, 512), (0.5, 2.0))
    np.testing.assert_array_equal(got_img, results["img"][..., ::-1])
    np.testing.assert_array_equal(got_gt, results["gt"])
  assert seg_transforms.rescale_size(512, 683, (2048, 512)) == (512, 683)
  assert seg_transforms.rescale_size(375, 500, (1024, 256)) == (256, 341)  # 341.33 -> 341
  assert seg_transforms.rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side bound
  assert seg_transforms.rescale_size(1024, 1025, (2048, 512)) == (512, 513)  # 512.5 rounds up


def test_image_decode_matches_mmseg_cv2_loader():
  """mmseg's LoadImageFromFile decodes with cv2.imdecode (BGR); ours gives the same RGB."""
  base = Image.fromarray(_random_image(np.random.default_rng(7), 61, 83))
  for mode, options in [
      ("RGB", {}),
      ("RGB", {"subsampling": 0}),
      ("RGB", {"progressive": True}),
      ("L", {}),
  ]:
    buf = io.BytesIO()
    base.convert(mode).save(buf, "JPEG", quality=90, **options)
    ours, _ = transforms.decode(buf.getvalue())
    theirs = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(ours, theirs[..., ::-1], err_msg=f"{mode} {options}")


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


def test_images_are_turned_by_their_exif_orientation_as_mmseg_reads_them():
  """mmseg's cv2.imdecode turns a colour image by its EXIF orientation (a phone photo); Pillow's
  read of an annotation ('unchanged') does not: ours reads both so, for the 8 orientations of a
  TIFF (which Pillow's decode turns: not turned twice), a JPEG and a PNG. An annotation of the
  stored size no longer fits a quarter-turned image."""
  rng = np.random.default_rng(3)
  stored = _random_image(rng, 6, 10)
  for fmt, options in (("TIFF", {}), ("JPEG", {"quality": 95}), ("PNG", {})):
    for orientation in range(1, 9):
      img = Image.fromarray(stored)
      exif = img.getexif()
      exif[transforms.EXIF_ORIENTATION] = orientation
      buf = io.BytesIO()
      img.save(buf, fmt, exif=exif.tobytes(), **options)
      theirs = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
      label = _blocky_label(rng, *theirs.shape[:2])
      record = {"image": buf.getvalue(), "label": _png(label), "label_key": "a.png"}
      image, ours, _ = seg_pipeline._decode(record, _cfg("", reduce_zero_label=False))
      np.testing.assert_array_equal(image, theirs, err_msg=f"{fmt} {orientation}")
      np.testing.assert_array_equal(ours, label)
  last = buf.getvalue()
  # ImageMagick's 'Raw profile type exif' text chunk, which cv2 does not read (Pillow's getexif
  # does, decoding the whole PNG again to find it): the image as stored
  img = Image.fromarray(stored)
  exif = img.getexif()
  exif[transforms.EXIF_ORIENTATION] = 6
  text = PngImagePlugin.PngInfo()
  raw = exif.tobytes()
  text.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}\n")
  buf = io.BytesIO()
  img.save(buf, "PNG", pnginfo=text)
  theirs = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
  with Image.open(io.BytesIO(buf.getvalue())) as pil:
    assert pil.getexif()[transforms.EXIF_ORIENTATION] == 6  # what Pillow alone would apply
  record = {"image": buf.getvalue(), "label": _png(_blocky_label(rng, 6, 10)), "label_key": "a.png"}
  image, _, _ = seg_pipeline._decode(record, _cfg("", reduce_zero_label=False))
  np.testing.assert_array_equal(image, theirs)
  np.testing.assert_array_equal(image, stored)
  record["image"] = last  # PNG, orientation 8
  record["label"] = _png(_blocky_label(rng, 6, 10))  # orientation 8 turns 10x6 into 6x10
  with pytest.raises(
      transforms.BadImageError,
      match=r"^annotation a.png is 10x6, image 6x10 turned upright by its EXIF orientation$",
  ):
    seg_pipeline._decode(record, _cfg(""))


def test_cv2_bilinear_does_not_antialias_like_pil():
  """Why cv2: on a 4x downscale PIL's bilinear averages a wide support, cv2's does not."""
  stripes = np.zeros((64, 64, 3), np.uint8)
  stripes[:, ::4] = 255  # 1-pixel lines every 4 pixels
  ours = seg_transforms.resize(stripes, 16, 16)
  pil = np.asarray(Image.fromarray(stripes).resize((16, 16), Image.Resampling.BILINEAR))
  assert (pil[:, 1:-1] == 64).all()  # antialiased to the mean (borders aside)
  assert np.unique(ours).size == 1 and ours[0, 0, 0] == 0  # cv2 samples between the lines


def test_cat_max_ratio_crop_matches_mmseg():
  """Redraws while one class covers >= 75% (255 ignored), the 11th box taken unchecked."""
  rng = np.random.default_rng(1)
  redrawn = exhausted = 0
  for seed in range(40):
    h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    img, gt = _random_image(rng, h, w), _blocky_label(rng, h, w, block=8, dominant=0.85)
    ours, theirs = np.random.default_rng(seed), LegacyRandom(seed)
    got = seg_transforms.random_crop(ours, img, gt, (32, 40), 0.75, 255)
    results = {"img": img, "gt": gt}
    draws = mmseg_random_crop(theirs, results, (32, 40), 0.75)
    np.testing.assert_array_equal(got[0], results["img"])
    np.testing.assert_array_equal(got[1], results["gt"])
    assert got[1].shape == (min(h, 32), min(w, 40))
    assert ours.random() == theirs.random_sample()  # the same number of draws
    redrawn += draws > 1
    exhausted += draws == 11
  assert redrawn >= 10 and exhausted >= 1  # both branches exercised
  one = np.zeros((40, 40), np.uint8)  # cat_max_ratio 1: a single draw, no check
  gen = np.random.default_rng(0)
  seg_transforms.random_crop(gen, np.zeros((40, 40, 3), np.uint8), one, (32, 32), 1.0, 255)
  want = np.random.default_rng(0)
  want.integers(0, 9), want.integers(0, 9)
  assert gen.random() == want.random()


def test_flip_matches_mmseg():
  rng = np.random.default_rng(2)
  img, gt = _random_image(rng, 20, 30), _blocky_label(rng, 20, 30)
  flips = 0
  for seed in range(12):
    got_img, got_gt = seg_transforms.random_flip(np.random.default_rng(seed), img, gt, 0.5)
    results = {"img": img, "gt": gt}
    mmseg_random_flip(LegacyRandom(seed), results, 0.5)
    np.testing.assert_array_equal(got_img, results["img"])
    np.testing.assert_array_equal(got_gt, results["gt"])
    flips += not np.array_equal(got_img, img)
  assert 0 < flips < 12


def test_photometric_distortion_matches_mmseg_bgr():
  """Our RGB version with cv2's RGB<->HSV equals mmseg's BGR one, every branch and order."""
  rng = np.random.default_rng(3)
  img = _random_image(rng, 24, 30)
  img[0, :6] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 5, 128]]
  changed = 0
  for seed in range(64):
    got = seg_transforms.photometric_distortion(
        np.random.default_rng(seed), img, 32, (0.5, 1.5), (0.5, 1.5), 18
    )
    want = mmseg_photometric(LegacyRandom(seed), img[..., ::-1].copy())[..., ::-1]
    np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
    changed += not np.array_equal(got, img)
  assert changed >= 50  # all four ops skip together with probability 1/16


def test_pad_and_device_normalize_match_mmseg():
  """Pad after Normalize: padding is 0 after normalization, 255 in the label."""
  rng = np.random.default_rng(4)
  mean, std = fd.ade20k_config().mean, fd.ade20k_config().std
  imgs, gts, valids, wants, want_gts = [], [], [], [], []
  for h, w in [(20, 32), (32, 11), (32, 32)]:
    img, gt = _random_image(rng, h, w), _blocky_label(rng, h, w)
    padded, padded_gt, valid = seg_transforms.pad(img, gt, (32, 32), 255)
    want, want_gt = mmseg_normalize_pad(img[..., ::-1].copy(), gt, (32, 32), mean, std)
    imgs.append(padded), gts.append(padded_gt), valids.append(valid)
    wants.append(want), want_gts.append(want_gt)
  assert valids[1].tolist() == [32, 11] and np.stack(imgs).dtype == np.uint8
  np.testing.assert_array_equal(np.stack(gts), np.stack(want_gts))
  got = jax.jit(seg_device_transforms.normalize, static_argnums=(2, 3))(
      np.stack(imgs), np.stack(valids), mean, std
  )
  np.testing.assert_allclose(np.asarray(got), np.stack(wants), rtol=0, atol=2e-6)
  assert np.asarray(got)[0, 20:].max() == 0 and np.asarray(got)[0, :20].min() < -1


def test_train_transform_matches_mmseg_pipeline():
  """The composed host pipeline against mmseg's Resize -> RandomCrop -> RandomFlip ->
  PhotoMetricDistortion -> (Normalize) -> Pad, one stream of draws."""
  cfg = fd.ade20k_config()
  cfg.img_scale, cfg.crop_size = (256, 64), (64, 64)
  rng = np.random.default_rng(5)
  for seed in range(6):
    img, gt = _random_image(rng, 60, 90), _blocky_label(rng, 60, 90, dominant=0.7)
    got_img, got_gt, valid = seg_transforms.train_transform(
        np.random.default_rng(seed), img, gt, cfg
    )
    theirs = LegacyRandom(seed)
    results = {"img": img[..., ::-1].copy(), "gt": gt}
    mmseg_resize(theirs, results, cfg.img_scale, cfg.ratio_range)
    mmseg_random_crop(theirs, results, cfg.crop_size, cfg.cat_max_ratio)
    mmseg_random_flip(theirs, results, cfg.flip_prob)
    want = mmseg_photometric(theirs, np.ascontiguousarray(results["img"]))[..., ::-1]
    h, w = want.shape[:2]
    assert valid.tolist() == [h, w] and got_img.shape == (64, 64, 3)
    np.testing.assert_array_equal(got_img[:h, :w], want)
    assert not got_img[h:].any() and not got_img[:, w:].any()
    _, want_gt = mmseg_normalize_pad(want[..., ::-1], results["gt"], (64, 64), cfg.mean, cfg.std)
    np.testing.assert_array_equal(got_gt, want_gt)


def test_align_resize_matches_authors():
  cfg = fd.ade20k_config()
  rng = np.random.default_rng(6)
  for h, w in [(512, 683), (375, 500), (300, 1200), (97, 61)]:
    img = _random_image(rng, h, w)
    got = seg_transforms.eval_transform(img, cfg)
    np.testing.assert_array_equal(got, authors_align_resize(img, (2048, 512), 32))
    assert got.shape[0] % 32 == 0 and got.shape[1] % 32 == 0
  assert seg_transforms.eval_transform(np.zeros((375, 500, 3), np.uint8), cfg).shape == (
      512,
      704,
      3,
  )  # 512 x 682.67 -> 512 x 683 -> 704


# ---- source and loader tests ----


def test_ade20k_source_layout_and_order(ade):
  src = seg_sources.ADE20KSource(ade, "validation")
  assert len(src) == 5
  assert [src[i]["key"] for i in range(5)] == [
      os.path.join("images", "validation", f"ADE_val_{i:08d}.jpg") for i in range(1, 6)
  ]
  assert [src.key(i) for i in range(5)] == [src[i]["key"] for i in range(5)]  # without a read
  demo = seg_sources.make_seg_source(fd.seg_demo_config(), "val")
  assert demo.key(3) == demo[3]["key"] == demo[3]["label_key"] == "shapes-val-3"
  rec = src[0]
  assert rec["image"][:2] == b"\xff\xd8" and rec["label"][:4] == b"\x89PNG"
  assert fd.seg_num_examples(_cfg(ade), "train") == 10
  assert fd.seg_steps_per_epoch(_cfg(ade), 4) == 2
  assert fd.seg_num_eval_examples(_cfg(ade), shard_count=2) == 3


def test_file_names_that_are_not_ascii_are_read(tmp_path):
  """numpy's ASCII encoding of the paths raised UnicodeEncodeError for a name like 'café.jpg'
  while the split was listed; os.fsencode takes any name the folder holds."""
  root = make_ade20k_folder(tmp_path / "ade", num_train=2, num_val=1)
  for folder, suffix in (("images", ".jpg"), ("annotations", ".png")):
    old = os.path.join(root, folder, "training", "ADE_train_00000002" + suffix)
    os.rename(old, os.path.join(root, folder, "training", "café 猫" + suffix))
  record = seg_sources.ADE20KSource(root, "training")[1]
  assert record["key"] == os.path.join("images", "training", "café 猫.jpg")
  assert record["label_key"] == os.path.join("annotations", "training", "café 猫.png")
  assert record["image"][:2] == b"\xff\xd8" and record["label"][:4] == b"\x89PNG"


def test_annotations_without_an_image_are_named_and_not_used(tmp_path, caplog):
  root = make_ade20k_folder(tmp_path / "ade", num_train=4, num_val=2)
  os.remove(os.path.join(root, "images", "training", "ADE_train_00000002.jpg"))
  with caplog.at_level("WARNING", logger="fec_jax.data.seg_sources"):
    assert fd.seg_num_examples(_cfg(root), "train") == 3
  assert caplog.messages == [
      f"1 annotation under {root}/annotations/training without a .jpg image, not used (images "
      "are read as .jpg, as ADE20K's), first: ADE_train_00000002.png"
  ]


def test_an_image_with_another_suffix_is_named_in_the_warning(tmp_path, caplog):
  """An image saved as .png (or .JPG) next to its annotation is not read (mmseg reads .jpg):
  the warning says so and names the file, not only its annotation (which looked as if the
  image were missing)."""
  root = make_ade20k_folder(tmp_path / "ade", num_train=4, num_val=2)
  images = os.path.join(root, "images", "training")
  for name, suffix in (("ADE_train_00000002", ".png"), ("ADE_train_00000004", ".JPG")):
    with Image.open(os.path.join(images, name + ".jpg")) as img:
      img.save(os.path.join(images, name + suffix), format=suffix[1:].replace("JPG", "JPEG"))
    os.remove(os.path.join(images, name + ".jpg"))
  with caplog.at_level("WARNING", logger="fec_jax.data.seg_sources"):
    assert fd.seg_num_examples(_cfg(root), "train") == 2
  assert caplog.messages == [
      f"2 annotations under {root}/annotations/training without a .jpg image, not used (images "
      "are read as .jpg, as ADE20K's), first: ADE_train_00000002.png; with an image of another "
      f"suffix, which is not read: 2 of them, e.g. {images}/ADE_train_00000002.png"
  ]


def test_missing_annotation_and_layout_errors(tmp_path):
  root = make_ade20k_folder(tmp_path / "ade", num_train=4, num_val=2)
  os.remove(os.path.join(root, "annotations", "training", "ADE_train_00000003.png"))
  name = "ADE_train_00000003"
  with pytest.raises(fd.DataNotFoundError, match=f"{name}.jpg has no .*{name}.png"):
    fd.create_seg_loader(_cfg(root), "train", 2, seed=0)
  with pytest.raises(fd.DataNotFoundError, match=r"images/\{training,validation\}/\*\.jpg"):
    fd.create_seg_loader(_cfg(tmp_path / "nowhere"), "val", 1, seed=0)
  os.makedirs(tmp_path / "empty" / "images" / "training")
  os.makedirs(tmp_path / "empty" / "annotations" / "training")
  with pytest.raises(fd.DataNotFoundError, match="no .jpg images found"):
    fd.seg_num_examples(_cfg(tmp_path / "empty"), "train")
  (tmp_path / "empty" / "images" / "training" / "a.JPG").write_bytes(b"")
  with pytest.raises(fd.DataNotFoundError, match=r"\(1 file in another case, e.g. a.JPG\)"):
    fd.seg_num_examples(_cfg(tmp_path / "empty"), "train")
  pngs = tmp_path / "png"
  for kind in ("images", "annotations"):
    os.makedirs(pngs / kind / "training")
  for i in range(2):
    (pngs / "images" / "training" / f"img00{i}.png").write_bytes(b"")
  (pngs / "images" / "training" / "notes.txt").write_bytes(b"")  # not an image: not counted
  with pytest.raises(fd.DataNotFoundError) as e:
    fd.seg_num_examples(_cfg(pngs), "train")
  assert str(e.value).startswith(
      f"no .jpg images found under {pngs}/images/training (2 files with another suffix, e.g. "
      "img000.png: images are read as .jpg, as ADE20K's); expected the ADE20K layout"
  )
  make_ade20k_folder(tmp_path / "up" / "ADEChallengeData2016", num_train=1, num_val=1)
  inner = tmp_path / "up" / "ADEChallengeData2016"
  with pytest.raises(fd.DataNotFoundError, match=re.escape(f"(did you mean {inner}?)")):
    fd.seg_num_examples(_cfg(tmp_path / "up"), "train")
  with pytest.raises(fd.DataNotFoundError, match="root is empty"):
    fd.seg_num_examples(_cfg(""), "train")
  mine = tmp_path / "mine"  # one's own data, with other split names
  for kind in ("images", "annotations"):
    os.makedirs(mine / kind / "train")
    os.makedirs(mine / kind / "val")
  with pytest.raises(fd.DataNotFoundError) as e:
    fd.seg_num_examples(_cfg(mine), "val")
  assert str(e.value).startswith(
      f"{mine}/images/validation is not a directory ({mine}/images holds train, val; "
      "config.data.train_split and config.data.val_split name the split folders); expected"
  )


def test_root_inside_the_dataset_names_the_dataset(tmp_path, monkeypatch):
  """config.data.root given as <root>/images (or a split folder in it): the error names <root>,
  also for a relative root given from <root> (`images`: its folder above was '')."""
  root = make_ade20k_folder(tmp_path / "mine", num_train=1, num_val=1)
  monkeypatch.chdir(root)
  for given in (
      f"{root}/images",
      f"{root}/images/training/",
      f"{root}/annotations",
      "images",
      "images/training",
  ):
    with pytest.raises(fd.DataNotFoundError) as e:
      fd.seg_num_examples(_cfg(given), "train")
    assert f"is not a directory (did you mean {root}? config.data.root is the folder that" in str(
        e.value
    )


def test_an_annotation_with_another_suffix_is_named(tmp_path):
  """An annotation saved as a JPEG (or another suffix): the error names the file it found."""
  root = make_ade20k_folder(tmp_path, num_train=2, num_val=1)
  ann = os.path.join(root, "annotations", "training")
  os.rename(
      os.path.join(ann, "ADE_train_00000001.png"), os.path.join(ann, "ADE_train_00000001.jpg")
  )
  with pytest.raises(fd.DataNotFoundError) as e:
    fd.seg_num_examples(_cfg(root), "train")
  assert str(e.value).startswith(
      f"1 image without annotation, first: {root}/images/training/ADE_train_00000001.jpg has "
      f"no {ann}/ADE_train_00000001.png (found {ann}/ADE_train_00000001.jpg: annotations are read "
      "as .png, PNGs of class ids, as ADE20K's); expected the ADE20K layout"
  ), e.value


def test_an_annotation_named_with_a_suffix_of_its_own_is_named(tmp_path):
  """Masks named <stem>_mask.png (an mmseg dataset's seg_map_suffix '_mask.png'): the error names
  one and says how annotations are named; another image's annotation (ADE_train_00000001_b.png)
  is not taken for it."""
  root = make_ade20k_folder(tmp_path, num_train=2, num_val=1)
  ann = os.path.join(root, "annotations", "training")
  for i in (1, 2):
    name = f"ADE_train_{i:08d}"
    os.rename(os.path.join(ann, f"{name}.png"), os.path.join(ann, f"{name}_mask.png"))
  for folder in ("images", "annotations"):
    suffix = ".jpg" if folder == "images" else ".png"
    open(os.path.join(root, folder, "training", f"ADE_train_00000001_b{suffix}"), "wb").close()
  with pytest.raises(fd.DataNotFoundError) as e:
    fd.seg_num_examples(_cfg(root), "train")
  assert str(e.value).startswith(
      f"2 images without annotation, first: {root}/images/training/ADE_train_00000001.jpg has "
      f"no {ann}/ADE_train_00000001.png (found {ann}/ADE_train_00000001_mask.png: an annotation "
      "is named as its image, with .png for .jpg, as ADE20K's; rename the annotations); expected "
      "the ADE20K layout"
  ), e.value


def test_config_validation():
  cfg = fd.ade20k_config()
  fd.seg_validate(cfg)
  with pytest.raises(AttributeError, match="crop_szie"):
    cfg.crop_szie = (512, 512)  # the config is locked
  with cfg.unlocked():
    cfg.crop_szie = (512, 512)  # a config built by hand is checked too
  with pytest.raises(ValueError, match="crop_szie"):
    fd.seg_validate(cfg)
  cfg = fd.ade20k_config()
  cfg.cat_max_ratio = 0.0
  with pytest.raises(ValueError, match="cat_max_ratio"):
    fd.create_seg_loader(cfg, "train", 2, seed=0)  # before looking for data
  cfg = fd.seg_demo_config()
  cfg.num_classes = 150
  with pytest.raises(ValueError, match="demo has 5 classes"):
    fd.seg_validate(cfg)
  cfg = fd.seg_demo_config()
  cfg.std = ()
  with pytest.raises(ValueError, match="mean and std need 3 values"):
    fd.seg_validate(cfg)
  cfg = fd.ade20k_config()  # a background 0 to leave out: reduce_zero_label does that
  cfg.num_classes, cfg.reduce_zero_label, cfg.ignore_index = 3, False, 0
  with pytest.raises(ValueError) as e:
    fd.seg_validate(cfg)
  assert str(e.value) == (
      "config.data: ignore_index 0 must not be a class (>= num_classes 3); to leave out id 0 "
      "(background, 'other'), give --config.data.reduce_zero_label=True with ignore_index 255: "
      "ids 1..K are then the classes 0..K-1 (num_classes K), as ADE20K's"
  )
  cfg.ignore_index = 2
  with pytest.raises(ValueError, match=r"^config.data: ignore_index 2 must not be a class \(>= "):
    fd.seg_validate(cfg)
  cfg = fd.seg_demo_config()  # mmseg's img_norm_cfg: the images would be about -2 everywhere
  cfg.mean, cfg.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  with pytest.raises(ValueError) as e:
    fd.seg_validate(cfg)
  assert str(e.value) == (
      "config.data: mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375) must be on "
      "the 0-1 scale: images are normalized as (x / 255 - mean) / std, as torchvision's "
      "Normalize; values on the 0-255 scale (mmseg's img_norm_cfg) divided by 255 give them, "
      "e.g. ImageNet's --config.data.mean=0.485,0.456,0.406 --config.data.std=0.229,0.224,0.225"
  )
  cfg.mean = tuple(m / 255 for m in cfg.mean)  # the std alone on the 0-255 scale
  with pytest.raises(ValueError, match=r"^config.data: mean \(0.485, 0.456, 0.406\) and std \(58"):
    fd.seg_validate(cfg)
  cfg.std, cfg.mean = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)  # no normalization: fine
  fd.seg_validate(cfg)
  cfg = fd.seg_demo_config()
  cfg.img_scale = (96, 64, 70, 50)  # what ml_collections makes of a tuple override given twice
  with pytest.raises(
      ValueError,
      match=r"img_scale needs 2 positive sides \(--config.data.img_scale=2048,512\), got "
      r"\(96, 64, 70, 50\)",
  ):
    fd.seg_validate(cfg)
  cfg = fd.seg_demo_config()
  cfg.crop_size = (64,)  # what ml_collections makes of --config.data.crop_size=64
  with pytest.raises(ValueError, match=r"H and W \(--config.data.crop_size=512,512\), got \(64,\)"):
    fd.seg_validate(cfg)
  cfg = fd.ade20k_config()
  cfg.num_classes, cfg.class_names = 2, ("road,sky",)  # a tuple override without its quotes
  with pytest.raises(ValueError, match=r"class_names holds 1 name \('road,sky',\) for 2 classes"):
    fd.seg_validate(cfg)
  cfg.class_names = ("road", 1)
  with pytest.raises(ValueError, match="give one string per class"):
    fd.seg_validate(cfg)
  cfg.class_names = ("road", "sky")
  fd.seg_validate(cfg)


def test_train_batches_deterministic_and_shaped(ade):
  cfg = _cfg(ade)
  a = list(fd.create_seg_loader(cfg, "train", 4, seed=3, num_epochs=2))
  b = list(fd.create_seg_loader(cfg, "train", 4, seed=3, num_epochs=2))
  c = list(fd.create_seg_loader(cfg, "train", 4, seed=4, num_epochs=1))
  assert len(a) == 4 and set(a[0]) == {"image", "label", "valid"}
  assert a[0]["image"].shape == (4, 32, 32, 3) and a[0]["image"].dtype == np.uint8
  assert a[0]["label"].shape == (4, 32, 32) and a[0]["label"].dtype == np.uint8
  assert a[0]["valid"].shape == (4, 2) and a[0]["valid"].dtype == np.int32
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
  labels = np.concatenate([x["label"] for x in a])
  assert set(np.unique(labels)) <= set(range(5)) | {255}  # reduced: 0 -> 255, 1..5 -> 0..4
  valid = np.concatenate([x["valid"] for x in a])
  assert (valid < 32).any()  # some crops were padded ...
  for x in a:  # ... with 255 labels and zero images outside the valid box
    for img, lab, (h, w) in zip(x["image"], x["label"], x["valid"]):
      assert (lab[h:] == 255).all() and (lab[:, w:] == 255).all()
      assert not img[h:].any() and not img[:, w:].any()


def test_a_local_batch_of_one(ade):
  """A global batch of 1 (or one per process): the endless train order's length in grain's batch
  (a float) overflowed ("cannot fit 'int' into an index-sized integer") for most split sizes."""
  for n in (10, 6, 4):  # ade's 10 train records, and others
    order, steps, total = loader.train_order(n, 1, 0, 1, 0, None)
    assert (steps, len(grain.MapDataset.range(total).batch(1))) == (n, total)
  batch = next(fd.create_seg_loader(_cfg(ade), "train", 1, seed=0))
  assert batch["image"].shape == (1, 32, 32, 3)


def test_resume_mid_epoch_gives_the_same_batches(ade):
  cfg = _cfg(ade)
  ref = _take(fd.create_seg_loader(cfg, "train", 2, seed=0), 8)
  it = fd.create_seg_loader(cfg, "train", 2, seed=0)
  _take(it, 6)  # into the second epoch (5 steps each)
  state = json.loads(json.dumps(it.get_state()))
  fresh = fd.create_seg_loader(cfg, "train", 2, seed=0)
  fresh.set_state(state)
  for want, got in zip(ref[6:], _take(fresh, 2)):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_train_shards_disjoint_complete_and_independent_of_sharding(ade):
  cfg = _cfg(ade)
  whole = list(fd.create_seg_loader(cfg, "train", 2, seed=1, num_epochs=1))
  parts = [
      list(fd.create_seg_loader(cfg, "train", 2, 1, shard_index=h, shard_count=2, num_epochs=1))
      for h in range(2)
  ]
  for k in ("image", "label", "valid"):
    all_ = np.concatenate([b[k] for b in whole])
    for h in range(2):  # host h holds global positions h, h + 2, ...: same augmentation
      np.testing.assert_array_equal(np.concatenate([b[k] for b in parts[h]]), all_[h::2])


def test_val_examples_shards_and_padding(ade):
  cfg = _cfg(ade)
  src = seg_sources.ADE20KSource(ade, "validation")
  one = list(fd.create_seg_loader(cfg, "val", 1, seed=0))
  assert len(one) == 5 and all(e["mask"] for e in one)
  for i, e in enumerate(one):
    raw = np.asarray(Image.open(io.BytesIO(src[i]["label"])))
    np.testing.assert_array_equal(e["label"], mmseg_load_annotations(raw))  # original size
    assert e["image"].shape[0] % 32 == 0 and e["image"].shape[1] % 32 == 0
  shards = [
      list(fd.create_seg_loader(cfg, "val", 1, seed=0, shard_index=h, shard_count=2))
      for h in range(2)
  ]
  assert [len(s) for s in shards] == [3, 3]  # 5 = 3 + 2, host 1 padded to 3
  assert [bool(e["mask"]) for e in shards[1]] == [True, True, False]
  assert (shards[1][2]["label"] == 255).all()  # padding adds nothing to the metric
  for h in range(2):
    for j, e in enumerate(shards[h]):
      if e["mask"]:
        np.testing.assert_array_equal(e["label"], one[2 * j + h]["label"])
        np.testing.assert_array_equal(e["image"], one[2 * j + h]["image"])


def test_bad_files_replaced_or_masked_and_counted(tmp_path, caplog):
  root = make_ade20k_folder(tmp_path, num_train=6, num_val=3)
  for folder, prefix in (("training", "train"), ("validation", "val")):
    ann = os.path.join(root, "annotations", folder)
    img = os.path.join(root, "images", folder)
    with open(os.path.join(img, f"ADE_{prefix}_00000001.jpg"), "wb") as f:
      f.write(b"\xff\xd8 not a jpeg")
    with open(os.path.join(ann, f"ADE_{prefix}_00000002.png"), "wb"):
      pass  # empty annotation
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(
        os.path.join(ann, f"ADE_{prefix}_00000003.png")
    )  # wrong size
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(
      os.path.join(root, "annotations", "validation", "ADE_val_00000003.png")
  )  # a colour annotation in val
  cfg = _cfg(root)
  with caplog.at_level(logging.WARNING, logger="fec_jax.data.loader"):
    it = fd.create_seg_loader(cfg, "val", 1, seed=0)
    val = list(it)
  assert [bool(e["mask"]) for e in val] == [False, False, False]
  assert sorted(r.getMessage().split(": ", 1)[1] for r in caplog.records) == [
      "annotation annotations/validation/ADE_val_00000002.png: empty file",
      "annotation annotations/validation/ADE_val_00000003.png: mode RGB; expected a "
      "single-channel PNG of class ids ('L' or 'P'; or 1-bit, ids 0 and 1; or 16-bit, ids up to "
      "255)",
      "not an image file PIL can read",
  ]
  assert it.stats() == {"bad": 3, "converted": 0}
  it = fd.create_seg_loader(cfg, "train", 1, seed=0, num_epochs=1)
  got = list(it)
  # 6 train, the first 3 bad: each replaced by the 4th (its image and annotation), counted
  assert len(got) == fd.seg_steps_per_epoch(cfg, 1) == 6 and it.stats()["bad"] == 3
  cfg.num_workers = 2  # the same batches from worker processes
  it = fd.create_seg_loader(cfg, "train", 1, seed=0, num_epochs=1)
  again = list(it)
  it.close()
  for x, y in zip(got, again, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_an_image_too_thin_for_the_resize_is_a_bad_file(tmp_path, caplog):
  """An image 1 pixel high and 200 wide, with its annotation: its keep-ratio resize to (96, 48)
  would be 0 pixels high, which cv2 cannot make (a traceback in the loader, as in mmseg): a bad
  file, masked out in val; in train, where the resize draws ratio_range's low end, replaced."""
  root = make_ade20k_folder(tmp_path, num_train=3, num_val=2, sizes=((40, 48),))
  for folder, prefix in (("training", "train"), ("validation", "val")):
    name = f"ADE_{prefix}_00000001"
    Image.fromarray(np.zeros((1, 200, 3), np.uint8)).save(
        os.path.join(root, "images", folder, f"{name}.jpg")
    )
    Image.fromarray(np.ones((1, 200), np.uint8)).save(
        os.path.join(root, "annotations", folder, f"{name}.png")
    )
  cfg = _cfg(root, ratio_range=(1.0, 2.0))  # train's smallest scale: (96, 48), as val's
  with caplog.at_level(logging.WARNING, logger="fec_jax.data.loader"):
    val = list(fd.create_seg_loader(cfg, "val", 1, seed=0))
  assert [bool(e["mask"]) for e in val] == [False, True]
  assert caplog.messages == [
      "bad file images/validation/ADE_val_00000001.jpg masked out (val): 200x1 pixels, 96x0 after "
      "the keep-ratio resize to img_scale (96, 48): a side of 0 pixels, which cv2 cannot make (an "
      "image at most 192 times as wide as high, or as high as wide, can be resized so)"
  ]
  it = fd.create_seg_loader(cfg, "train", 1, seed=0, num_epochs=1)
  assert len(list(it)) == 3 and it.stats()["bad"] == 1
  cfg.ratio_range = (0.5, 2.0)  # 150 wide fits val's (96, 48), not train's smallest (48, 24)
  Image.fromarray(np.zeros((1, 150, 3), np.uint8)).save(
      os.path.join(root, "images", "training", "ADE_train_00000001.jpg")
  )
  Image.fromarray(np.ones((1, 150), np.uint8)).save(
      os.path.join(root, "annotations", "training", "ADE_train_00000001.png")
  )
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="fec_jax.data.loader"):
    it = fd.create_seg_loader(cfg, "train", 1, seed=0, num_epochs=1)
    assert len(list(it)) == 3 and it.stats()["bad"] == 1
  assert caplog.messages == [  # the scale it names is not img_scale's
      "bad file images/training/ADE_train_00000001.jpg replaced by the next readable record "
      "(train): 150x1 pixels, 48x0 after the keep-ratio resize to (48, 24), train's smallest "
      "(img_scale (96, 48) times ratio_range's low end 0.5): a side of 0 pixels, which cv2 cannot "
      "make (an image at most 96 times as wide as high, or as high as wide, can be resized so)"
  ]


def test_a_1_bit_annotation_is_ids_0_and_1(tmp_path):
  """A binary mask saved from a bool array is a 1-bit PNG (mode '1'): ids 0 and 1, as mmseg's
  LoadAnnotations reads it (astype(uint8)), not a bad file, in train and val."""
  root = make_ade20k_folder(tmp_path, num_train=1, num_val=1, num_classes=1, sizes=((40, 48),))
  mask = np.zeros((40, 48), bool)
  mask[8:24, 16:40] = True
  for folder, prefix in (("training", "train"), ("validation", "val")):
    path = os.path.join(root, "annotations", folder, f"ADE_{prefix}_00000001.png")
    Image.fromarray(mask).save(path)
    assert Image.open(path).mode == "1"
  cfg = _cfg(root, reduce_zero_label=False, num_classes=2)
  val = list(fd.create_seg_loader(cfg, "val", 1, seed=0))
  assert [bool(e["mask"]) for e in val] == [True]
  np.testing.assert_array_equal(val[0]["label"], mask.astype(np.uint8))
  it = fd.create_seg_loader(cfg, "train", 1, seed=0, num_epochs=1)
  (batch,) = list(it)
  assert it.stats()["bad"] == 0 and set(np.unique(batch["label"])) <= {0, 1, 255}


def test_a_16_bit_annotation_is_read_as_its_ids(tmp_path, caplog):
  """A 16-bit PNG of class ids (Pillow's 'I;16', as numpy's uint16 saves): its ids, as mmseg's
  LoadAnnotations reads it (astype(uint8)), in train and val; one with a value above 255, which
  that would wrap (256 to 0), is a bad file naming it."""
  root = make_ade20k_folder(tmp_path, num_train=1, num_val=2, num_classes=3, sizes=((40, 48),))
  ids = np.zeros((40, 48), np.uint16)
  ids[8:24, 16:40] = 2
  ids[30:, :] = 255
  for folder, prefix in (("training", "train"), ("validation", "val")):
    path = os.path.join(root, "annotations", folder, f"ADE_{prefix}_00000001.png")
    Image.fromarray(ids).save(path)
    assert Image.open(path).mode == "I;16"
  wide = os.path.join(root, "annotations", "validation", "ADE_val_00000002.png")
  Image.fromarray(np.full((40, 48), 256, np.uint16)).save(wide)
  cfg = _cfg(root, reduce_zero_label=False, num_classes=3)
  with caplog.at_level(logging.WARNING, logger="fec_jax.data.loader"):
    val = list(fd.create_seg_loader(cfg, "val", 1, seed=0))
  assert [bool(e["mask"]) for e in val] == [True, False]
  np.testing.assert_array_equal(val[0]["label"], ids.astype(np.uint8))
  assert [m.split(": ", 1)[1] for m in caplog.messages] == [
      "annotation annotations/validation/ADE_val_00000002.png: mode I;16 with values up to 256; "
      "expected class ids 0..255 (an 8-bit id as mmseg reads it: astype(uint8) would wrap a "
      "larger one)"
  ]
  it = fd.create_seg_loader(cfg, "train", 1, seed=0, num_epochs=1)
  (batch,) = list(it)
  assert it.stats()["bad"] == 0 and set(np.unique(batch["label"])) <= {0, 2, 255}


def test_train_with_no_readable_record_raises(tmp_path):
  """As in classification: with no readable record in the split, an error naming the root and
  why the first bad record failed (here every annotation is RGB, the images are fine)."""
  root = make_ade20k_folder(tmp_path, num_train=4, num_val=1)
  for i in range(4):
    path = os.path.join(root, "annotations", "training", f"ADE_train_{i + 1:08d}.png")
    Image.open(path).convert("RGB").save(path)
  it = fd.create_seg_loader(_cfg(root), "train", 2, seed=0)
  with pytest.raises(fd.DataNotFoundError) as e:
    next(it)
  assert re.fullmatch(
      re.escape(
          f"no readable record (image and annotation) in the 4 train records of {root}; expected "
          "images and annotations that decode (the first bad file, "
      )
      + r"images/training/ADE_train_0000000(\d)\.jpg: annotation "
      + r"annotations/training/ADE_train_0000000\1\.png"
      + re.escape(
          ": mode RGB; expected a single-channel PNG of class ids ('L' or 'P'; "
          "or 1-bit, ids 0 and 1; or 16-bit, ids up to 255); the warnings above name every one)"
      ),
      str(e.value),
  ), e.value


@pytest.mark.parametrize(
    "reduce_zero_label, num_classes, expected",
    [
        (True, 4, "expected 0 ('other'), 1..4 (config.data.num_classes 4 with reduce_zero_label)"),
        (False, 5, "expected 0..4 (config.data.num_classes 5)"),
    ],
)
def test_train_labels_outside_the_classes_raise(ade, reduce_zero_label, num_classes, expected):
  """The fixture's annotations hold 0..5: class 5 (4 after reduce_zero_label) is outside 4
  classes (5 without it) and would make the loss NaN; the loader names the annotation and the
  value the file holds. Val keeps mmseg's metric, which leaves such labels out (fec_jax.miou)."""
  cfg = _cfg(ade, num_classes=num_classes, reduce_zero_label=reduce_zero_label)
  with pytest.raises(ValueError) as e:
    next(fd.create_seg_loader(cfg, "train", 2, seed=0))
  assert str(e.value) == (
      "the annotation annotations/training/ADE_train_00000001.png holds class ids [5]; "
      f"{expected} or 255 (ignore_index): config.data.num_classes (or reduce_zero_label) does "
      "not fit the data"
  )
  assert len(list(fd.create_seg_loader(cfg, "val", 1, seed=0))) == 5
  next(fd.create_seg_loader(_cfg(ade), "train", 2, seed=0))  # 5 classes: fine


def test_demo_source_deterministic_and_loader():
  cfg = fd.seg_demo_config()
  a, b = seg_sources.demo_example(0, "train", 7, 64), seg_sources.demo_example(0, "train", 7, 64)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  v = seg_sources.demo_example(0, "val", 7, 64)
  assert not np.array_equal(a[0], v[0])
  labels = np.stack([seg_sources.demo_example(0, "train", i, 64)[1] for i in range(100)])
  share = np.bincount(labels.ravel()) / labels.size
  assert share.size == 5 and 0.7 < share[0] < 0.95 and (share[1:] > 0.01).all()
  assert fd.seg_num_examples(cfg, "train") == 2000 and fd.seg_num_examples(cfg, "val") == 200
  batch = next(fd.create_seg_loader(cfg, "train", 8, seed=0))
  assert batch["image"].shape == (8, 64, 64, 3) and batch["label"].max() <= 255
  val = next(fd.create_seg_loader(cfg, "val", 1, seed=0))
  assert val["image"].shape == (64, 64, 3) and val["label"].shape == (64, 64)
  np.testing.assert_array_equal(val["label"], seg_sources.demo_example(0, "val", 0, 64)[1])


def test_demo_image_size_sets_the_resize_and_the_crop():
  """img_scale and crop_size of the demo follow demo_image_size (an override of the size alone
  made 96x96 images resized to 64 and cropped to 64x64); one given itself stays as given."""
  import pickle

  cfg = fd.seg_demo_config()
  assert (cfg.demo_image_size, cfg.img_scale, cfg.crop_size) == (64, (64, 64), (64, 64))
  cfg.demo_image_size = 96
  assert (cfg.img_scale, cfg.crop_size) == ((96, 96), (96, 96))
  assert json.loads(cfg.to_json())["crop_size"] == [96, 96]  # as config.json records it
  fd.seg_validate(cfg)
  assert next(fd.create_seg_loader(cfg, "train", 2, seed=0))["image"].shape == (2, 96, 96, 3)
  val = next(fd.create_seg_loader(cfg, "val", 1, seed=0))
  assert val["image"].shape == (96, 96, 3) and val["label"].shape == (96, 96)
  copy = pickle.loads(pickle.dumps(cfg))  # as worker processes get it: still linked
  copy.demo_image_size = 128
  assert copy.crop_size == (128, 128) and cfg.crop_size == (96, 96)
  cfg.crop_size = (64, 64)  # given: stays, and img_scale still follows
  cfg.demo_image_size = 160
  assert (cfg.img_scale, cfg.crop_size) == ((160, 160), (64, 64))
  assert next(fd.create_seg_loader(cfg, "train", 2, seed=0))["image"].shape == (2, 64, 64, 3)


def test_the_demo_links_its_sides_with_public_ml_collections_api():
  """demo_config derives img_scale and crop_size from demo_image_size by FieldReference
  arithmetic (it built them with ml_collections' private _Op, which a release may rename or
  drop); the links stay references of type tuple, as the command line's overrides need."""
  import inspect
  import re

  from fec_jax.data import seg_config

  assert re.findall(r"\b(?:config_dict|ml_collections)\._\w+", inspect.getsource(seg_config)) == []
  cfg = fd.seg_demo_config()
  assert [cfg.get_ref(f).get_type() for f in ("img_scale", "crop_size")] == [tuple, tuple]


def test_seg_bench_times_the_loader_work(tmp_path):
  from fec_jax.data import seg_bench

  root = seg_bench.make_ade20k_like(str(tmp_path), num_images=2)
  assert fd.seg_num_examples(_cfg(root, num_classes=150), "train") == 2
  for train in (True, False):
    assert seg_bench.time_examples(root, train, repeats=1) > 0
