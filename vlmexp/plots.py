"""The report's plots (OOF confusion, per-class F1 change), readable whatever the labels' script.

Matplotlib's default DejaVu Sans has no CJK glyphs: labels such as 优惠券 drew as boxes, and the
warning was filtered away. Now a label the default font cannot draw makes the plots use an
installed CJK font; without one they number the classes (0, 1, ...), the report prints the
legend (`0 = 优惠券`) as Markdown text, and the log says how to install a font.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vlmexp import metrics

log = logging.getLogger(__name__)

# Fonts with CJK glyphs and Latin ones, as Debian's fonts-wqy-microhei / fonts-noto-cjk and macOS
# / Windows name them; the first installed one that draws every label is used.
CJK_FONTS = (
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Source Han Sans SC",
    "PingFang SC",
    "Microsoft YaHei",
    "SimHei",
)
INSTALL_HINT = (
    "install a CJK font (Debian/Ubuntu: sudo apt-get install fonts-noto-cjk, or the 5 MB "
    "fonts-wqy-microhei), then delete ~/.cache/matplotlib so matplotlib sees it"
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def _charmap(name: str) -> set[int]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
    return set(FT2Font(path).get_charmap())


def find_font(chars: set[str]) -> str | None:
    """The first installed font of CJK_FONTS that has a glyph for every one of `chars`, else None."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in installed and {ord(c) for c in chars} <= _charmap(name):
            return name
    return None


def tick_names(labels: list[str]) -> tuple[list[str], dict[str, str]]:
    """(what the plots write for each class, legend {number: label} when they write numbers).

    Sets the font the plots draw with: the default when it has every glyph, else a CJK font.
    """
    plt = _plt()
    missing = {c for label in labels for c in label if not c.isspace()} - {
        chr(c) for c in _charmap("DejaVu Sans")
    }
    plt.rcParams["font.sans-serif"] = ["DejaVu Sans"]
    if not missing:
        return list(labels), {}
    font = find_font(missing)
    if font:
        plt.rcParams["font.sans-serif"] = [font, "DejaVu Sans"]
        return list(labels), {}
    log.warning(
        "no installed font draws the characters of labels such as %r: the plots number the classes and "
        "report.md lists which number is which; to see the labels themselves, %s",
        next(label for label in labels if set(label) & missing),
        INSTALL_HINT,
    )
    return [str(i) for i in range(len(labels))], {str(i): label for i, label in enumerate(labels)}


def plot_confusion(name: str, oof, labels: list[str], ticks: list[str], path: Path) -> Path:
    plt = _plt()
    cm = metrics.confusion(oof["label"], oof["pred"], labels)
    size = 2 + 0.5 * len(cm.columns)
    fig, ax = plt.subplots(figsize=(size, size))
    m = cm.to_numpy()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(ticks)), ticks, rotation=90)
    ax.set_yticks(range(len(ticks)), ticks)
    for (i, j), v in np.ndenumerate(m):
        color = "white" if v > m.max() / 2 else "black"  # legible on dark cells
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{name}: OOF confusion")
    return _save(fig, path)


def plot_f1_change(title: str, change: np.ndarray, ticks: list[str], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2 + 0.5 * len(change), 4))
    ax.bar(range(len(change)), change, color=["tab:green" if d >= 0 else "tab:red" for d in change])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(change)), ticks, rotation=90)
    ax.set_ylabel("F1 change vs baseline")
    ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path
