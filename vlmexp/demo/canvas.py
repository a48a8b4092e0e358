"""The demo's drawing kit: a screenshot canvas with jittered colours, its fonts, and random page text.

Every draw takes its jitter from the canvas's own `random.Random`, so one seed gives the same pixels.
"""

from __future__ import annotations

import functools
import random
import warnings
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_DIRS = (Path(__file__).parents[1] / "fonts", Path("/usr/share/fonts/truetype/dejavu"))
RGB = tuple[int, int, int]
WHITE, GREY, DARK, RED, ORANGE = (255, 255, 255), (150, 150, 150), (30, 30, 30), (220, 40, 40), (245, 130, 30)


@functools.cache
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in FONT_DIRS:
        if (folder / name).exists():
            return ImageFont.truetype(str(folder / name), size)
    warnings.warn(
        f"demo: font {name} not found in {', '.join(map(str, FONT_DIRS))}; using PIL's built-in font, "
        "so images differ from other machines. Fix: apt-get install fonts-dejavu-core",
        stacklevel=2,
    )
    return ImageFont.load_default(size)


class Canvas:
    """One screenshot being drawn, with its own random source for every jitter."""

    def __init__(self, rng: random.Random, w: int, h: int, bg: RGB):
        self.rng, self.w, self.h = rng, w, h
        self.img = Image.new("RGB", (w, h), self.jit(bg, 6))
        self.d = ImageDraw.Draw(self.img)

    def jit(self, rgb: RGB, amount: int = 14) -> RGB:
        return tuple(min(255, max(0, c + self.rng.randint(-amount, amount))) for c in rgb)

    def text(self, xy: tuple[float, float], s: str, size: int = 15, bold: bool = False, fill: RGB = DARK):
        self.d.text(xy, s, font=font(size, bold), fill=fill)

    def button(self, box: tuple[float, float, float, float], label: str, colour: RGB, size: int = 17):
        self.d.rounded_rectangle(box, radius=8, fill=self.jit(colour))
        x0, y0, x1, y1 = box
        tw = self.d.textlength(label, font=font(size, True))
        self.text(((x0 + x1 - tw) / 2, (y0 + y1 - size) / 2 - 1), label, size, True, WHITE)

    def status_bar(self) -> int:
        self.text((10, 4), f"{self.rng.randint(7, 23)}:{self.rng.randint(0, 59):02d}", 12)
        self.d.rectangle((self.w - 34, 7, self.w - 12, 16), outline=(60, 60, 60), width=1)
        self.d.rectangle((self.w - 32, 9, self.w - 32 + self.rng.randint(4, 18), 14), fill=(60, 60, 60))
        return 22

    def header(self, top: int, title: str, colour: RGB) -> int:
        bottom = top + self.rng.randint(44, 56)
        self.d.rectangle((0, top, self.w, bottom), fill=self.jit(colour))
        size = self.rng.randint(18, 22)
        self.text((self.rng.randint(12, 20), (top + bottom - size) / 2), "<", size, True, WHITE)
        self.text((self.rng.randint(38, 60), (top + bottom - size) / 2 - 1), title, size, True, WHITE)
        return bottom


def pick(options: str, rng: random.Random) -> str:
    """One of the '|'-separated options, e.g. pick("Pay now|Confirm and pay", rng)."""
    return rng.choice(options.split("|"))


NOISE = "Home|Help|v2.4.1|Mall|Deals|Ad|Today|Share|More|Live|Hot|New"
PRODUCTS = "Wireless earbuds|Running shoes|Desk lamp|Phone case|Rice cooker|Backpack|Green tea"


def money(rng: random.Random, lo: int = 5, hi: int = 300) -> str:
    return f"${rng.randint(lo, hi)}.{pick('00|50|99|49|20', rng)}"


def date(rng: random.Random) -> str:
    return f"{pick('2024-03|2024-07|2025-01|2025-11', rng)}-{rng.randint(1, 28):02d}"
