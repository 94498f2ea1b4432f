"""The `visualize.py` command: FEC's growing clusters drawn over images (paper Fig. 3, Sec. 5.2).

  python visualize.py --checkpoint ckpt/fec_small --image a.jpg b.png --num-clusters 3 --out vis/

For each image it writes
  {stem}_k{K}.png     the K-Means groups of the final clusters as colored masks over the image,
                      at the image's own size (one file per --num-clusters value)
  {stem}_levels.png   a strip: the model input, then the clusters of every level
                      (network.1, .3, .5 linked by Eq. 8), then the K-Means groups; each
                      title gives the number of clusters (groups) the panel shows
  {stem}_encodings.png  with --encodings: a grid of the encoding (Cluster) layers' clusters over
                      the model input, one row per layer (by default each stage's last block),
                      one panel per head, each titled with its number of clusters
and prints a classifier's predicted class with its probability (with its logit for a task of
one's own). Images of the same name get _1, _2, ... after the stem (the command says which). A
dense backbone (fec_*_seg, _det) or a Semantic FPN segmenter (fpn_*) shows its backbone's
clusters, and no class.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
import time

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from fec_jax import cli, interpret, reporting
from fec_jax.checkpoint import (
    CheckpointError,
    check_directory,
    load_model,
    load_pretrained,
    output_in_a_checkpoint,
)
from fec_jax.data import seg_transforms, split_holding
from fec_jax.data.classes import classification_names, numbered, own_names, own_names_origin
from fec_jax.data.device_transforms import normalize
from fec_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, decode, upright
from fec_jax.model import is_classifier, variable_shapes

DEFAULT_IMAGE_SIZE = 224  # ImageNet's, which the official checkpoints were trained at
GROUP_COLORS = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [170, 110, 40],
    ],
    np.uint8,
)


def palette(n: int) -> np.ndarray:
  """[n, 3] uint8: GROUP_COLORS for up to 12 groups; beyond, hues a golden angle apart (each next
  color far from the last ones) at alternating saturation and brightness, as vivid as the 12
  (fixed random RGB drew many greyish, alike colors for an encoding head's dozens of clusters)."""
  if n <= len(GROUP_COLORS):
    return GROUP_COLORS[:n]
  i = np.arange(n - len(GROUP_COLORS))
  hsv = np.stack([(i * 0.381966) % 1.0, 0.95 - 0.3 * (i % 2), 0.95 - 0.25 * (i // 2 % 2)], -1)
  rgb = np.asarray(Image.fromarray(np.uint8((hsv[None] * 255).round()), "HSV").convert("RGB"))[0]
  return np.concatenate([GROUP_COLORS, rgb])


def boundaries(labels: np.ndarray) -> np.ndarray:
  """[H, W] bool: pixels whose right or lower neighbour is in another cluster."""
  edge = np.zeros(labels.shape, bool)
  edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
  edge[:-1] |= labels[:-1] != labels[1:]
  return edge


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Colored masks of labels [H, W] (ints) over image [H, W, 3] uint8, cluster borders in black."""
  _, dense = np.unique(labels, return_inverse=True)
  colors = palette(int(dense.max()) + 1)[dense.reshape(labels.shape)]
  out = (1 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
  out[boundaries(labels)] = 0
  return out.round().astype(np.uint8)


def median_filter(labels: np.ndarray, size: int) -> np.ndarray:
  """The paper's "medium filtering" of a group map [H, W] (int ids); size 0 = off.

  PIL filters the ids as int32 (mode 'I'), not uint8: with more than 256 groups (e.g.
  --num-clusters 300) uint8 would wrap the ids and merge different groups. The median of a window
  is one of its ids, so no new group is made up; borders repeat the edge pixels.
  """
  if size <= 1:
    return labels
  ids = Image.fromarray(np.ascontiguousarray(labels, np.int32))  # group ids < H * W fit int32
  return np.asarray(ids.filter(ImageFilter.MedianFilter(size))).astype(labels.dtype)


def strip(panels: list[np.ndarray], titles: list[str]) -> Image.Image:
  """Panels [H, W, 3] uint8 side by side, each with its title above."""
  h, w = panels[0].shape[:2]
  font = ImageFont.load_default(size=max(10, w // 16))
  top = font.size + 8
  canvas = Image.new("RGB", (len(panels) * (w + 4) - 4, h + top), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (panel, title) in enumerate(zip(panels, titles)):
    canvas.paste(Image.fromarray(panel), (i * (w + 4), top))
    draw.text((i * (w + 4) + 2, 3), title, fill="black", font=font)
  return canvas


def grid(rows: list[Image.Image]) -> Image.Image:
  """Strips (`strip`) one below the other, left-aligned; a shorter row leaves white on its right."""
  canvas = Image.new(
      "RGB", (max(r.width for r in rows), sum(r.height + 4 for r in rows) - 4), "white"
  )
  top = 0
  for row in rows:
    canvas.paste(row, (0, top))
    top += row.height + 4
  return canvas


def load_image(path: str, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(original RGB [H0, W0, 3] uint8, model input [h, w, 3] uint8), as the official script reads
  and resizes (cv2.imread, cv2.resize; docs/official-code.md Sec. 9): upright by the EXIF
  orientation, then resized directly (no crop) with OpenCV's bilinear to `size`, (h, w) or one
  side of a square.

  Decoded as the training data is (read_image)."""
  height, width = (size, size) if isinstance(size, (int, np.integer)) else size
  original = read_image(path)
  return original, seg_transforms.resize(original, height, width)


def read_image(path: str) -> np.ndarray:
  """An image file as uint8 RGB [H, W, 3], upright by its EXIF orientation (upright), decoded
  as the training data is (transforms.decode): grayscale, palette, CMYK and alpha images become
  RGB, and a 16-bit image is scaled to 8 bits, where PIL's convert("RGB") would clip it to
  white. Raises OSError or transforms.BadImageError (check_images catches both first)."""
  with open(path, "rb") as f:
    encoded = f.read()
  return upright(decode(encoded)[0], encoded)


def image_stem(path: str) -> str:
  """An image's file name without its directory and suffix (a/cat.jpg -> cat)."""
  return os.path.splitext(os.path.basename(path))[0]


def unique_stems(paths: list[str]) -> list[str]:
  """File stems, distinct: where two images share one, the later ones are suffixed _1, _2, ...,
  skipping any name already taken and any other image's own stem (a/cat.jpg b/cat.png cat_1.png
  -> cat, cat_2, cat_1), so that no image's PNGs overwrite another's."""
  own = [image_stem(path) for path in paths]
  reserved, taken = set(own), set()
  stems = []
  for base in own:
    name, n = base, 0
    while name in taken or (n and name in reserved):
      n += 1
      name = f"{base}_{n}"
    taken.add(name)
    stems.append(name)
  return stems


def render(
    out_dir: str,
    stem: str,
    original: np.ndarray,
    resized: np.ndarray,
    levels: np.ndarray,
    names: tuple[str, ...],
    groups: dict[int, np.ndarray],
    alpha: float,
) -> None:
  """Writes {stem}_k{K}.png per K and {stem}_levels.png; levels [L+1, h, w], groups {K: [h, w]}."""
  size = original.shape[:2]
  for k, g in groups.items():
    full = np.asarray(interpret.resize_nearest(g, size))
    Image.fromarray(overlay(original, full, alpha)).save(os.path.join(out_dir, f"{stem}_k{k}.png"))
  image, shown = zoomed(resized)
  masks = [*levels[1:], *groups.values()]
  panels = [image] + [
      overlay(image, np.asarray(interpret.resize_nearest(m, shown)), alpha) for m in masks
  ]
  titles = ["input"] + [f"{n}: {len(np.unique(lv))}" for n, lv in zip(names[1:], levels[1:])]
  titles += [f"K-Means k={k}: {len(np.unique(g))}" for k, g in groups.items()]
  strip(panels, titles).save(os.path.join(out_dir, f"{stem}_levels.png"))


def zoomed(resized: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
  """(the model input as the strips draw it, its (H, W)): small inputs (e.g. the 32x32 demo)
  enlarged by a whole factor to at least 224 pixels a side, nearest neighbour."""
  zoom = max(1, 224 // min(resized.shape[:2]))
  shown = (resized.shape[0] * zoom, resized.shape[1] * zoom)
  return np.asarray(Image.fromarray(resized).resize(shown[::-1], Image.Resampling.NEAREST)), shown


def render_encodings(
    out_dir: str, stem: str, resized: np.ndarray, encodings: dict[str, np.ndarray], alpha: float
) -> None:
  """Writes {stem}_encodings.png: one row per layer of encodings {name: [heads, h, w]}, one panel
  per head, its clusters over the model input; the first panel of a row names the layer."""
  image, shown = zoomed(resized)
  rows = []
  for name, maps in encodings.items():
    full = np.asarray(interpret.resize_nearest(maps, shown))
    layer = name.removesuffix(".token_mixer")
    titles = [
        f"{layer + ' ' if e == 0 else ''}head {e}: {len(np.unique(m))}" for e, m in enumerate(maps)
    ]
    rows.append(strip([overlay(image, m, alpha) for m in full], titles))
  grid(rows).save(os.path.join(out_dir, f"{stem}_encodings.png"))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def cluster_maps(
    model, variables, images, layers: tuple[str, ...] = (), heads: int | None = None
) -> interpret.Clusters:
  """interpret.cluster_maps with the encodings of `layers` only (official names), each its first
  `heads` heads (None: all): XLA leaves the other layers' maps out, so that a pass holds only the
  maps drawn. No layers: the encodings are not asked for (the program without them)."""
  clusters = interpret.cluster_maps(model, variables, images, bool(layers))
  return clusters._replace(encodings={n: clusters.encodings[n][:, :heads] for n in layers})


# --encodings LAYER: a stage (network.S, S = 0, 2, 4, 6) or one block of it
# (network.S.J[.token_mixer])
ENCODING_LAYER = re.compile(r"network\.(\d+)(?:\.(\d+)(?:\.token_mixer)?)?")


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
      prog="visualize.py",
      description=__doc__,
      formatter_class=cli.HelpFormatter,
      # train.py's, eval.py's and visualize_seg.py's name of a run
      meant={"--workdir": "--checkpoint, which takes a train.py workdir too"},
  )
  p.add_argument("--checkpoint", required=True, help="converter output or train.py workdir (Orbax)")
  p.add_argument("--image", required=True, nargs="+", help="image files (one or more)")
  p.add_argument("--out", required=True, help="output directory for the PNGs")
  p.add_argument(
      "--num-clusters",
      type=int,
      nargs="+",
      default=[3],
      help="K-Means groups of the final clusters (several values: one overlay each)",
  )
  p.add_argument(
      "--feature",
      choices=interpret.FEATURES,
      default="centers",
      help="K-Means feature: the last pool's similarity-space centers (official script) "
      "or its representatives R (Eq. 6, the paper's text)",
  )
  p.add_argument(
      "--image-size",
      type=int,
      nargs="+",
      default=None,
      help="model input size: S or H W (images are resized to it without cropping); "
      "must give even maps at every pool, e.g. a multiple of 32 (default: the image size, or a "
      f"segmenter's crop size, of a train.py workdir's run, else {DEFAULT_IMAGE_SIZE})",
  )
  p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
  p.add_argument(
      "--median-filter",
      type=int,
      default=0,
      help="odd window of the paper's median filter on the K-Means masks (0 = off)",
  )
  p.add_argument(
      "--encodings",
      nargs="*",
      metavar="LAYER",
      help="also write {stem}_encodings.png: the clusters of encoding (Cluster) layers over the "
      "model input, one row per layer, one panel per head (up to 12 for fec_large). LAYER: "
      "network.S.J (block J of the stage at network.S, S = 0, 2, 4, 6: e.g. network.4.2), "
      "network.S (every block of that stage), "
      "last (the last block of every stage) or all (every block: 24 rows for fec_large). Without "
      "LAYER: last, four rows for every model, each stage's last clustering before its "
      "ClusterPool (or the head)",
  )
  p.add_argument(
      "--heads",
      type=int,
      default=None,
      metavar="N",
      help="with --encodings: the first N heads of each layer (default: all; a layer of fewer "
      "heads has each drawn), e.g. 1 for one column to follow a head down the blocks with "
      "--encodings all",
  )
  p.add_argument("--alpha", type=float, default=0.5, help="mask opacity")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--ema", action="store_true", help="use the EMA weights of a train.py run")
  p.add_argument(
      "--overwrite",
      action="store_true",
      help="replace PNGs of the same names already in --out (without it: an error)",
  )
  return p


def _output_names(stems: list[str], num_clusters: list[int], encodings: bool = False) -> list[str]:
  """The files `render` (and, with encodings, `render_encodings`) write for these images, in
  order."""
  return [
      f"{stem}_{kind}.png"
      for stem in stems
      for kind in [
          *(f"k{k}" for k in num_clusters),
          "levels",
          *(["encodings"] if encodings else []),
      ]
  ]


def trained_config(checkpoint: str) -> dict:
  """A train.py workdir's config.json: its task, and in its data section the image size and
  normalization its model was trained with; {} for a converter output (an ImageNet classifier,
  DEFAULT_IMAGE_SIZE)."""
  with cli.user_errors(ValueError):
    saved = reporting.read_config(checkpoint) if os.path.isdir(checkpoint) else None
  return saved or {}


def check_images(paths: list[str]) -> None:
  """fail() for the first --image path that is empty, missing, a directory or not an image PIL
  reads to the end (a truncated or corrupt file): one line naming it, before any slow work."""
  cli.check_paths_given([("--image", path, "an image file") for path in paths])
  for path in paths:
    if not os.path.isfile(path):
      cli.fail(
          f"--image {path} "
          + (
              "is a directory; expected image files (e.g. dir/*.jpg)"
              if os.path.isdir(path)
              else "does not exist"
          )
      )
    try:
      with Image.open(path) as img:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      cli.fail(f"--image {path} is not a readable image ({type(e).__name__}: {e})")


def check_args(args: argparse.Namespace) -> tuple[tuple[int, int], dict]:
  """Every mistake in the arguments, found before the checkpoint is read: returns (H, W) and
  trained_config(--checkpoint)."""
  if args.image_size is not None and (len(args.image_size) > 2 or min(args.image_size) < 1):
    cli.fail(f"--image-size takes S or H W (positive), got {' '.join(map(str, args.image_size))}")
  for flag, values, low in (
      ("--num-clusters", args.num_clusters, 1),
      ("--batch-size", [args.batch_size], 1),
      ("--median-filter", [args.median_filter], 0),
      ("--step", [] if args.step is None else [args.step], 0),
      ("--heads", [] if args.heads is None else [args.heads], 1),
  ):
    if values and min(values) < low:
      cli.fail(f"{flag} must be at least {low}, got {min(values)}")
  repeated = sorted({k for k in args.num_clusters if args.num_clusters.count(k) > 1})
  if repeated:
    cli.fail(f"--num-clusters gives {repeated[0]} more than once; each K writes one picture")
  if args.median_filter > 1 and args.median_filter % 2 == 0:
    cli.fail(f"--median-filter must be odd (or 0 = off), got {args.median_filter}")
  if not 0 <= args.alpha <= 1:
    cli.fail(f"--alpha is an opacity between 0 and 1, got {args.alpha}")
  if args.encodings is None and args.heads is not None:
    cli.fail("--heads sets the columns of the --encodings picture; give --encodings too")
  for layer in args.encodings or []:
    if layer not in ("last", "all") and not ENCODING_LAYER.fullmatch(layer):
      cli.fail(
          f"--encodings takes network.S (every block of the stage at network.S, S = 0, 2, 4, "
          f"6), network.S.J (block J), last or all, got {layer!r}"
      )
  cli.check_paths_given(
      [("--checkpoint", args.checkpoint, "a checkpoint directory")]
      + [("--image", path, "an image file") for path in args.image]
      + [("--out", args.out, "an output directory")]
  )
  with cli.user_errors(CheckpointError):
    check_directory(args.checkpoint, "--checkpoint")
  check_images(args.image)
  problem = cli.not_a_directory(args.out)
  if problem is not None:
    cli.fail(f"--out {args.out}: {problem}; expected a directory for the PNGs")
  problem = output_in_a_checkpoint(args.out, "--out")  # e.g. a workdir's 7: its step 7 to a run
  if problem is not None:
    cli.fail(problem)
  trained = trained_config(args.checkpoint)
  data = trained.get("data", {})
  inside = split_holding(data, args.out)  # what a workdir's config.json says of the run's data
  if inside is not None:
    cli.fail(
        f"--out {args.out} lies in the {inside[0]} split of the run's data, {inside[1]} "
        f"(config.data.root in {reporting.config_file(args.checkpoint)}): its folders are classes "
        "and its images examples, so a run on that data would read the PNGs as images of a "
        "class; give an --out outside the data's split folders"
    )
  existing = [
      name
      for name in _output_names(
          unique_stems(args.image), args.num_clusters, args.encodings is not None
      )
      if os.path.exists(os.path.join(args.out, name))
  ]
  if existing and not args.overwrite:
    more = f" and {len(existing) - 1} more of this run's files" if len(existing) > 1 else ""
    cli.fail(
        f"--out {args.out} already holds {existing[0]}{more}; pass --overwrite to replace "
        f"{'them' if more else 'it'}, or choose another --out"
    )
  # A run's image size: a classifier's image_size, a segmenter's crop_size [H, W].
  default = data.get("image_size") or data.get("crop_size") or DEFAULT_IMAGE_SIZE
  size = args.image_size or (default if isinstance(default, list) else [default])
  return tuple(size * 2 if len(size) == 1 else size), trained


def note_num_clusters(model, size: tuple[int, int], num_clusters: list[int]) -> None:
  """A note on stderr where K-Means is asked for more groups than the model has final clusters
  at this input size (the last ClusterPool's centers, e.g. 7x7 at 224; traced with shapes only):
  that picture shows fewer groups than asked."""
  images = jax.ShapeDtypeStruct((1, *size, 3), jax.numpy.float32)
  clusters = jax.eval_shape(
      functools.partial(interpret.cluster_maps, model), variable_shapes(model), images
  )
  final = math.prod(clusters.centers.shape[1:-1])  # [1, h, w, D]
  over = [k for k in num_clusters if k > final]
  if over:
    pictures = reporting.listed([f"k{k}" for k in over], 5)
    print(
        f"note: at {size[0]}x{size[1]} the model has {reporting.counted(final, 'final cluster')} "
        f"(the last ClusterPool's centers), so the {pictures} "
        f"picture{'s show' if len(over) > 1 else ' shows'} at most "
        f"{reporting.counted(final, 'group')} (a larger --image-size has more)",
        file=sys.stderr,
    )


def encoding_layers(model, given: list[str]) -> tuple[str, ...]:
  """The Cluster layers that --encodings `given` names (checked by check_args; [] = last), in
  forward order, each once, as `Clusters.encodings` names them; fail() for a layer the model
  lacks, listing its stages."""
  names = interpret.encoding_names(model)
  depths = model.variant.depths
  stage = interpret.encoding_stage
  last = {n for n, after in zip(names, names[1:]) if stage(n) != stage(after)} | {names[-1]}
  chosen = set()
  for layer in given or ["last"]:
    if layer in ("last", "all"):
      chosen |= last if layer == "last" else set(names)
      continue
    match = ENCODING_LAYER.fullmatch(layer)
    index, block = int(match[1]), match[2]  # network.{index}[.{block}]
    prefix = f"network.{index}." + ("" if block is None else f"{int(block)}.")
    found = {n for n in names if n.startswith(prefix)}
    if not found:
      pool = block is None and index % 2 == 1 and index < 2 * len(depths) - 1
      stages = ", ".join(
          f"network.{2 * s} (block{f's 0-{d - 1}' if d > 1 else ' 0'})"
          for s, d in enumerate(depths)
      )
      cli.fail(
          f"--encodings {layer} "
          + ("is a ClusterPool (drawn in the _levels.png strip)" if pool else "is not in the model")
          + f"; its encoding layers are the blocks of the stages {stages}"
      )
    chosen |= found
  return tuple(n for n in names if n in chosen)


def note_heads(model, layers: tuple[str, ...], heads: int | None) -> None:
  """A note on stderr where --heads asks for more heads than any layer drawn has: the picture
  has fewer columns than asked."""
  most = max((model.variant.heads[interpret.encoding_stage(n)] for n in layers), default=0)
  if heads is not None and heads > most:
    print(
        f"note: --heads {heads}: the layers drawn have at most {most} heads; each is drawn",
        file=sys.stderr,
    )


def _run(
    model,
    variables,
    x: np.ndarray,
    size: tuple[int, int],
    batch: int,
    layers: tuple[str, ...],
    heads: int | None,
):
  """cluster_maps on a batch; one error line where the device has not the memory for it."""
  try:
    # blocked here: a device runs it asynchronously, and its failure would come later
    return jax.block_until_ready(cluster_maps(model, variables, x, layers, heads))
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    cli.fail(
        f"the model at {size[0]}x{size[1]}, {reporting.counted(batch, 'image')} per pass, needs "
        "more memory than "
        f"the {jax.default_backend()} device has ({str(e).strip().splitlines()[0]}); give a "
        "smaller --image-size or --batch-size"
        + (", or fewer --encodings layers or --heads" if layers else "")
    )


def trained_classes(checkpoint: str) -> tuple[str, ...] | None:
  """The names a train.py run's data gave its labels when it started (its classes.json); None
  where it has no record (a run of an earlier fec-jax, a converter output)."""
  with cli.user_errors(ValueError):
    recorded = reporting.read_classes(checkpoint) if os.path.isdir(checkpoint) else None
  return None if recorded is None else recorded[0]


def class_names(
    data: dict, num_classes: int, recorded: tuple[str, ...] | None = None
) -> tuple[str, ...]:
  """The names of a classifier's classes (classification_names of a run's data section): those
  `recorded` at the run's start (trained_classes: what its labels meant, even where its class
  folders were renamed or moved since), else its data's now, with a note where a train.py run's
  own are no longer found (its class folders moved or changed) or are not as many as the model's
  classes (a task of one's own whose head is not one output per class folder): they are then
  numbered; and with a note where the data now names its labels otherwise than the record."""
  names = classification_names(data, num_classes, recorded)
  now = own_names(data) if recorded and names else None
  if now and now != recorded:  # eval.py and a resume stop here; a picture's names are the record's
    print(
        f"note: the {own_names_origin(data)} now name the run's labels otherwise than when it "
        f"started (its {reporting.CLASSES_FILE}, whose names are printed)",
        file=sys.stderr,
    )
  origin = f"class names in {reporting.CLASSES_FILE}" if recorded else own_names_origin(data)
  if names is None and origin:
    own = recorded or own_names(data)
    why = (
        f"name {len(own)} classes, the model has {num_classes}: they"
        if own
        else f"are gone or changed: its {num_classes} classes"
    )
    print(
        f"note: the run's {origin} {why} are printed as 'class 0', 'class 1', ...", file=sys.stderr
    )
  return names or numbered(num_classes)


def prediction(logits: np.ndarray, classes: tuple[str, ...], task: str | None) -> str:
  """A classifier's top class: with its softmax probability where the run trained a softmax (a
  converter output, task None, or a classification run); with its logit for a task of one's own,
  whose head need not be a softmax's (a multi-label head's is a sigmoid per class)."""
  top = int(np.argmax(logits))  # logits: [num_classes]
  if task in (None, "classification"):
    return f"{classes[top]} ({float(jax.nn.softmax(logits)[top]):.1%})"
  return f"{classes[top]} (logit {float(logits[top]):.2f}; task {task!r}: no softmax probability)"


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  size, trained = check_args(args)
  data = trained.get("data", {})
  recorded = trained_classes(args.checkpoint)
  mean, std = data.get("mean", IMAGENET_MEAN), data.get("std", IMAGENET_STD)
  start = time.perf_counter()
  with cli.user_errors(CheckpointError):
    model = load_model(args.checkpoint, step=args.step)[0]
    cli.check_input_size(model, size, "--image-size")
    layers = () if args.encodings is None else encoding_layers(model, args.encodings)
    model, variables = load_pretrained(args.checkpoint, step=args.step, ema=args.ema)
  note_num_clusters(model, size, args.num_clusters)  # after the errors, the weights' included
  note_heads(model, layers, args.heads)
  names = interpret.level_names(model)
  classes = class_names(data, model.num_classes, recorded)
  stems = unique_stems(args.image)
  for path, name in zip(args.image, stems):
    if name != image_stem(path):
      print(
          f"note: {path} is written as {name}_*.png (another --image has its name)", file=sys.stderr
      )
  batch = min(args.batch_size, len(args.image))
  for first in range(0, len(args.image), batch):
    paths = args.image[first : first + batch]
    loaded = [load_image(p, size) for p in paths]
    pixels = np.stack([np.asarray(r) for _, r in loaded])  # uint8 [n, H, W, 3]
    x = np.asarray(normalize(pixels, mean, std))
    x = np.concatenate([x, np.repeat(x[-1:], batch - len(paths), axis=0)])  # one shape per run
    clusters = _run(model, variables, x, size, batch, layers, args.heads)
    os.makedirs(args.out, exist_ok=True)  # after the first forward pass: an error leaves none
    clusters = jax.tree.map(lambda a: np.asarray(a)[: len(paths)], clusters)  # drop the padding
    groups = {k: interpret.group_batch(clusters, k, args.feature) for k in args.num_clusters}
    for i, (path, (original, resized)) in enumerate(zip(paths, loaded)):
      g = {k: median_filter(v[i], args.median_filter) for k, v in groups.items()}
      render(
          args.out, stems[first + i], original, resized, clusters.levels[i], names, g, args.alpha
      )
      if layers:
        maps = {n: clusters.encodings[n][i] for n in layers}
        render_encodings(args.out, stems[first + i], resized, maps, args.alpha)
      if is_classifier(model):
        print(f"{path}: {prediction(clusters.outputs[i], classes, trained.get('task'))}")
  print(
      f"{reporting.counted(len(args.image), 'image')} in {time.perf_counter() - start:.1f} s -> "
      f"{args.out} "
      f"(model input {size[0]}x{size[1]})"
  )
  return 0
