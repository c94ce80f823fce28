"""A loss curve drawn with PIL (no plotting library needed in the notebook)."""

from __future__ import annotations

import io
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

RAW_COLOUR = (190, 200, 215)
SMOOTH_COLOUR = (25, 90, 200)
AXIS_COLOUR = (90, 90, 90)


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for k, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** k))
    return out


def loss_curve(losses: Sequence[float], size: tuple[int, int] = (480, 200), *,
               total_steps: int | None = None) -> Image.Image:
    """The raw loss per step (light) and its smoothed trend (dark), with min/max and steps."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 46, 10, 16, 18
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle((left, top, left + plot_w, top + plot_h), outline=AXIS_COLOUR)
    draw.text((left, 2), "loss (raw, smoothed)", fill=AXIS_COLOUR, font=font)
    if not losses:
        draw.text((left + 8, top + plot_h // 2 - 6), "waiting for the first step...",
                  fill=AXIS_COLOUR, font=font)
        return image
    trend = smooth(losses)
    low, high = min(losses), max(losses)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    steps = max(len(losses), total_steps or 0, 2)

    def point(k: int, value: float) -> tuple[float, float]:
        x = left + plot_w * k / (steps - 1)
        y = top + plot_h * (1 - (value - low) / (high - low))
        return x, y

    for values, colour, line in ((losses, RAW_COLOUR, 1), (trend, SMOOTH_COLOUR, 2)):
        points = [point(k, v) for k, v in _thin(values, plot_w)]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        else:
            draw.line(points, fill=colour, width=line)
    draw.text((2, top - 4), f"{high:.3g}", fill=AXIS_COLOUR, font=font)
    draw.text((2, top + plot_h - 8), f"{low:.3g}", fill=AXIS_COLOUR, font=font)
    draw.text((left, top + plot_h + 3), "step 1", fill=AXIS_COLOUR, font=font)
    label = f"step {steps}" if total_steps else f"step {len(losses)}"
    draw.text((left + plot_w - 6 * len(label), top + plot_h + 3), label, fill=AXIS_COLOUR,
              font=font)
    return image


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG (what ``ipywidgets.Image`` shows)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _thin(values: Sequence[float], buckets: int) -> list[tuple[int, float]]:
    """At most about ``buckets`` (index, mean) points: one per pixel column is enough."""
    n = len(values)
    if n <= buckets:
        return list(enumerate(values))
    size = n / buckets
    out = []
    for b in range(buckets):
        start, end = int(b * size), max(int((b + 1) * size), int(b * size) + 1)
        chunk = values[start:end]
        out.append(((start + end - 1) // 2, sum(chunk) / len(chunk)))
    return out
