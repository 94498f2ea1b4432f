"""The picture of visualize_seg.py: a segmenter's class maps over their images, one row per
image under the image's name, with a legend of the classes shown. Pure numpy and PIL, so that
tests draw in process (the command's absl flags are global)."""

import numpy as np
from PIL import Image, ImageDraw

from fec_jax.data import classes

ALPHA = 0.6  # the default weight of the class colour over the image (visualize_seg.py --alpha)
PAD = 4  # pixels between panels, and between legend entries (3 PAD)
SWATCH = 14  # a legend entry's colour box (x to x + 10, both drawn: 11 pixels) and the gap after it
WIDEST = 4  # a panel is at most WIDEST times its height wide (panel_size)
# The column titles, each with its shorter forms for narrow panels (fit_title): of a val image
# with its annotation (TITLES), of an image of one's own (IMAGE_TITLES: no ground truth).
IMAGE, TRUTH, PREDICTION = (
    ("image", "img"),
    ("ground truth", "truth", "GT"),
    ("prediction", "pred.", "pred"),
)
TITLES = (IMAGE, TRUTH, PREDICTION)
IMAGE_TITLES = (IMAGE, PREDICTION)


def palette(d) -> np.ndarray:
  """uint8 [num_classes, 3] for data config `d`: mmseg's colours for ADE20K's classes; else
  fixed colours for the first 5 classes (the demo's) and seeded random ones beyond."""
  if classes.is_ade20k(d):
    return classes.ade20k()[1]
  fixed = np.array([[40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200]])
  extra = np.random.default_rng(0).integers(0, 256, (max(d.num_classes - len(fixed), 0), 3))
  return np.concatenate([fixed, extra])[: d.num_classes].astype(np.uint8)


def overlay(
    image: np.ndarray, label: np.ndarray, colours: np.ndarray, alpha: float = ALPHA
) -> np.ndarray:
  """uint8 [H, W, 3] image with each pixel's class colour blended in with weight `alpha` (1:
  the class colours alone, as in the legend); labels outside the palette (the ignore index)
  leave the image as it is."""
  known = label < len(colours)  # [H, W]
  coloured = colours[np.where(known, label, 0)].astype(np.float32)  # [H, W, 3]
  blend = (1 - alpha) * image.astype(np.float32) + alpha * coloured
  return np.where(known[..., None], blend, image).round().astype(np.uint8)


def panel_size(h: int, w: int, height: int) -> tuple[int, int]:
  """(rows, columns) of the panel of an h x w image: `height` rows keeping its ratio, but at most
  WIDEST * height columns, with fewer rows, for an image that is wider still (one 1 pixel high
  and 50 wide made panels 9600 wide at 192 rows, and a picture 28816 pixels wide)."""
  width = max(1, round(w * height / h))
  if width <= WIDEST * height:
    return height, width
  return max(1, round(h * WIDEST * height / w)), WIDEST * height


def panel(array: np.ndarray, height: int) -> Image.Image:
  """An image scaled to its panel's size (panel_size), nearest (class edges stay sharp)."""
  rows, columns = panel_size(*array.shape[:2], height)
  return Image.fromarray(array).resize((columns, rows), Image.NEAREST)


def legend_rows(names: list[str], width: int, text_width) -> list[list[tuple[int, int]]]:
  """The legend's entries line by line, each as (index into `names`, x of its swatch); a line is
  at most `width` pixels wide where an entry fits at all (text_width(name) -> pixels)."""
  rows, x = [[]], PAD
  for i, name in enumerate(names):
    entry = SWATCH + int(text_width(name)) + 3 * PAD  # swatch, name, gap
    if rows[-1] and x + entry > width:
      rows.append([])
      x = PAD
    rows[-1].append((i, x))
    x += entry
  return rows if rows[0] else []


def text_width(pen: ImageDraw.ImageDraw, text: str) -> int:
  """Pixels from the left of `text` drawn with pen's font to the right end of its advance or of
  its ink, whichever is further ('GT' inks a pixel past its advance)."""
  return max(int(np.ceil(pen.textlength(text))), pen.textbbox((0, 0), text)[2]) if text else 0


def fit_title(forms: tuple[str, ...], width: int, measure) -> str:
  """The first of `forms` (a title, then shorter forms of it) at most `width` pixels wide
  (measure(text) -> pixels), else the longest start of the last one that is ('' if none): a
  title never runs into the next panel's."""
  for form in forms:
    if measure(form) <= width:
      return form
  last = forms[-1]
  return next((last[:n] for n in range(len(last) - 1, 0, -1) if measure(last[:n]) <= width), "")


def fit_name(name: str, width: int, measure) -> str:
  """`name` (a row's: its file's) if at most `width` pixels wide (measure(text) -> pixels), else
  its longest start and end around "..." that are (ADE_val_00000001.jpg -> ADE_val...001.jpg in
  80 pixels: the end tells such files apart), else cut as fit_title cuts. Three dots, not the
  ellipsis character, which PIL's fallback font (without FreeType) lacks."""
  cuts = (
      name[: (n + 1) // 2] + "..." + name[len(name) - n // 2 :] for n in range(len(name) - 1, 0, -1)
  )
  return fit_title((name, *cuts), width, measure)


def draw(
    rows: list[tuple[np.ndarray, ...]],
    colours: np.ndarray,
    names: tuple[str, ...],
    height: int,
    alpha: float = ALPHA,
    titles: tuple[tuple[str, ...], ...] = TITLES,
    row_names: tuple[str, ...] | None = None,
) -> Image.Image:
  """rows of (image, *class maps) of one size (a val image: its label and the prediction, at the
  annotation's size; an image of one's own: the prediction) -> the picture, a panel for the
  image and one for each map (`titles`: the columns'; panel_size: `height` rows, fewer for a very
  wide image; each column as wide as its widest panel, so that rows of other image sizes keep
  their panels under the titles), with a legend of the classes the maps show, at least as wide
  as its widest entry (a very narrow image's panels cut its names); `alpha`: see overlay.
  `row_names` (the images' file names), one a row: each on a line of its own above its row's
  first panel, shortened to the column's width (fit_name)."""
  title_h = 16  # a line of text: the column titles, a row's name, a line of the legend
  name_h = 0 if row_names is None else title_h
  panels = [
      [panel(image, height)] + [panel(overlay(image, m, colours, alpha), height) for m in maps]
      for image, *maps in rows
  ]
  present = np.unique(np.concatenate([np.unique(m) for _, *maps in rows for m in maps]))
  shown = [int(c) for c in present if c < len(names)]  # not the ignore index
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  entries = [SWATCH + int(np.ceil(measure.textlength(names[c]))) + 2 * PAD for c in shown]
  columns = [max(p.width for p in column) for column in zip(*panels)]
  lefts = PAD + np.cumsum([0] + [w + PAD for w in columns[:-1]])  # each column's x
  width = max([sum(columns) + PAD * (len(columns) + 1)] + entries)
  legend = legend_rows([names[c] for c in shown], width, measure.textlength)
  legend_h = len(legend) * title_h + (PAD if legend else 0)
  # Each row: its name, its panels and the gap under them.
  tops = np.cumsum([title_h] + [name_h + row[0].height + PAD for row in panels])
  canvas = Image.new("RGB", (width, int(tops[-1]) + PAD + legend_h), "white")
  pen = ImageDraw.Draw(canvas)
  for forms, x, w in zip(titles, lefts, columns, strict=True):
    pen.text((int(x), 2), fit_title(forms, w, lambda t: text_width(pen, t)), fill="black")
  for r, row in enumerate(panels):
    y = int(tops[r])
    if row_names is not None:  # in its line as the titles in theirs
      name = fit_name(row_names[r], columns[0], lambda t: text_width(pen, t))
      pen.text((PAD, y + 2), name, fill="black")
      y += name_h
    for x, p in zip(lefts, row):
      canvas.paste(p, (int(x), y))
  for line, entries in enumerate(legend):
    y = canvas.height - legend_h + line * title_h
    for i, x in entries:
      c = shown[i]
      pen.rectangle((x, y + 2, x + 10, y + 12), fill=tuple(int(v) for v in colours[c]))
      pen.text((x + SWATCH, y), names[c], fill="black")
  return canvas
