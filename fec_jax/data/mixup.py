"""Mixup / CutMix with label smoothing on device, timm's `Mixup` / `FastCollateMixup` in 'batch'
mode.

docs/official-code.md Sec. 8: Mixup alpha 0.8 / CutMix alpha 1.0, prob 1, switch 0.5, one lambda
per batch, the partner of image i is image B-1-i (the batch reversed), the CutMix box
from `rand_bbox` with the lambda corrected to the pasted area, targets from timm's
`mixup_target` (smoothed one-hots mixed with lambda). Written in jax (not timm's numpy
draws) so it runs jitted on the device's shard of the batch, as the official per-GPU
mixing does.
"""

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, label_smoothing: float):
  """[B] int -> [B, num_classes] float32 with off = ls / K, on = 1 - ls + off (timm)."""
  off = label_smoothing / num_classes
  on = 1.0 - label_smoothing + off
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off


def cutmix_box(height: int, width: int, lam, cy, cx):
  """timm rand_bbox: cut = int(side * sqrt(1 - lam)), box [c - cut // 2, c + cut // 2)
  around the centre (cy, cx), clipped. This is timm < 1.0, which the official training
  ran; timm >= 1.0.10 ends the box at c + (cut + 1) // 2 (one more row/column when the
  side is odd).

  Returns (yl, yh, xl, xh) int32 scalars and the corrected lambda 1 - area / (H * W).
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  yl = jnp.clip(cy - cut_h // 2, 0, height)
  yh = jnp.clip(cy + cut_h // 2, 0, height)
  xl = jnp.clip(cx - cut_w // 2, 0, width)
  xh = jnp.clip(cx + cut_w // 2, 0, width)
  lam = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (height * width)
  return (yl, yh, xl, xh), lam


def mix_with_params(
    images,
    labels,
    num_classes: int,
    lam,
    use_cutmix,
    cy,
    cx,
    label_smoothing: float,
    round_blend: bool = False,
):
  """Mixes a batch with given parameters (timm Mixup._mix_batch + mixup_target).

  images [B, H, W, C] (any float dtype), labels [B] int; lam float scalar; use_cutmix
  bool scalar; cy, cx int scalars (CutMix box centre); round_blend: round Mixup's blend to
  integers, as timm's FastCollateMixup does on uint8 images (np.rint, half to even). Returns
  (images, targets [B, num_classes] float32).
  """
  height, width = images.shape[1], images.shape[2]
  (yl, yh, xl, xh), lam_cut = cutmix_box(height, width, lam, cy, cx)
  partner = images[::-1]
  iy = jnp.arange(height)[:, None]
  ix = jnp.arange(width)[None, :]
  inside = (iy >= yl) & (iy < yh) & (ix >= xl) & (ix < xh)  # [H, W]
  cut = jnp.where(inside[None, :, :, None], partner, images)
  lam_mix = jnp.asarray(lam, jnp.float32)
  blend = images * lam_mix.astype(images.dtype) + partner * (1.0 - lam_mix).astype(images.dtype)
  if round_blend:
    blend = jnp.round(blend)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  mixed = jnp.where(use_cutmix, cut, blend)
  mixed = jnp.where(lam_mix == 1.0, images, mixed)  # timm returns early when lam == 1
  y = smooth_one_hot(labels, num_classes, label_smoothing)
  return mixed, y * lam + y[::-1] * (1.0 - lam)


def mixup_cutmix(
    rng,
    images,
    labels,
    num_classes: int,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float,
    switch_prob: float,
    label_smoothing: float,
    round_blend: bool = False,
):
  """timm Mixup(mode='batch') on one batch: pure jax, jittable.

  rng: a jax PRNG key; images [B, H, W, C] float; labels [B] int; round_blend: see
  mix_with_params (the uint8 values of FastCollateMixup). With
  probability `prob` the batch is mixed: CutMix (lambda ~ Beta(cutmix_alpha)) with
  probability `switch_prob` when both alphas are > 0, else Mixup (lambda ~
  Beta(mixup_alpha)). Returns (images [B, H, W, C], soft targets [B, num_classes]
  float32). With both alphas 0 it only smooths the labels.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, smooth_one_hot(labels, num_classes, label_smoothing)
  k_apply, k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(rng, 6)
  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  # a disabled branch draws with a dummy alpha; jnp.where below never selects it
  a_mix, a_cut = max(mixup_alpha, 1e-3), max(cutmix_alpha, 1e-3)
  lam_mix = jax.random.beta(k_mix, a_mix, a_mix)
  lam_cut = jax.random.beta(k_cut, a_cut, a_cut)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0)
  cy = jax.random.randint(k_cy, (), 0, images.shape[1])
  cx = jax.random.randint(k_cx, (), 0, images.shape[2])
  return mix_with_params(
      images, labels, num_classes, lam, use_cutmix, cy, cx, label_smoothing, round_blend
  )
