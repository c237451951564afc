"""PNG figures drawn with Pillow (a dependency already): retrieval sheets and ROC curves."""
import os
import pathlib
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
HIT, MISS = (0, 170, 0), (220, 0, 0)


def _font(size: int = 12):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Older Pillow.
    return ImageFont.load_default()


def _save(img: Image.Image, path: pathlib.Path) -> None:
  tmp = path.with_name(path.name + ".tmp")
  img.save(tmp, format="PNG")
  os.replace(tmp, path)


def retrieval_sheet(path: pathlib.Path, queries: list[str], scores: np.ndarray,
                    relevant: np.ndarray, images: np.ndarray, k: int = 5,
                    thumb: int = 96) -> None:
  """One row per text query: the wrapped query, then its top-k images by score, each framed
  green (hit) or red (miss) and captioned with rank and cosine similarity."""
  text_w, pad, border = 260, 6, 4
  cell = thumb + 2 * border
  width = text_w + k * (cell + pad) + pad
  row_h = cell + 18 + pad
  sheet = Image.new("RGB", (width, 24 + row_h * len(queries)), "white")
  draw, font = ImageDraw.Draw(sheet), _font(12)
  draw.text((pad, 4), f"text -> image, top {k} (green = hit, red = miss)", fill="black",
            font=font)
  for r, query in enumerate(queries):
    y = 24 + r * row_h
    draw.multiline_text((pad, y), "\n".join(textwrap.wrap(query, 38)[:7]), fill="black",
                        font=font)
    order = np.argsort(-scores[r], kind="stable")[:k]
    for j, c in enumerate(order):
      x = text_w + j * (cell + pad)
      draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=HIT if relevant[r, c] else MISS)
      pixels = np.asarray(images[c])[..., 0]
      tile = Image.fromarray(pixels, "L").resize((thumb, thumb)).convert("RGB")
      sheet.paste(tile, (x + border, y + border))
      draw.text((x, y + cell + 2), f"#{j + 1} {scores[r, c]:.2f}", fill="black", font=font)
  _save(sheet, path)


def roc_curves(path: pathlib.Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]],
               title: str, size: int = 480) -> None:
  """ROC curves {name: (fpr, tpr, auc)} on one square plot with a legend and the diagonal."""
  margin, legend_h = 50, 16 * len(curves) + 8
  img = Image.new("RGB", (size + 2 * margin, size + 2 * margin + legend_h), "white")
  draw, font = ImageDraw.Draw(img), _font(12)
  x0, y0 = margin, margin + size  # Plot origin (bottom-left).

  def px(fx, fy):
    return x0 + fx * size, y0 - fy * size

  draw.rectangle([x0, margin, x0 + size, y0], outline="black")
  for t in np.linspace(0, 1, 6):
    draw.line([px(t, 0), (px(t, 0)[0], y0 + 4)], fill="black")
    draw.text((px(t, 0)[0] - 8, y0 + 6), f"{t:.1f}", fill="black", font=font)
    draw.line([px(0, t), (x0 - 4, px(0, t)[1])], fill="black")
    draw.text((x0 - 30, px(0, t)[1] - 6), f"{t:.1f}", fill="black", font=font)
  draw.line([px(0, 0), px(1, 1)], fill=(180, 180, 180), width=1)
  draw.text((x0, 10), title, fill="black", font=font)
  draw.text((x0 + size // 2 - 60, y0 + 22), "false positive rate", fill="black", font=font)
  draw.text((4, margin - 20), "true positive rate", fill="black", font=font)
  for i, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
    colour = COLOURS[i % len(COLOURS)]
    draw.line([px(f, t) for f, t in zip(fpr, tpr)], fill=colour, width=2)
    ly = y0 + 40 + 16 * i
    draw.line([(x0, ly + 6), (x0 + 20, ly + 6)], fill=colour, width=3)
    draw.text((x0 + 26, ly), f"{name}  AUC {auc:.3f}", fill="black", font=font)
  _save(img, path)
