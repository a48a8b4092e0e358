"""A deterministic synthetic competition: e-commerce app screenshots in 12 classes.

Some classes differ only in their words (payment vs refund_request share layout and colours;
order_details vs invoice likewise), others by layout or colour (product photo = one big shape,
chat = speech bubbles, coupons = red page of tickets). Class sizes are clearly imbalanced
(66 product photos vs 8 settings pages at n_train=400) and one label is CJK (`优惠券`).
The same seed gives byte-identical files: every image draws from its own `random.Random`
seeded by a string, and PNGs are saved with fixed parameters and no metadata.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pandas as pd
from PIL import Image

from vlmexp.demo.canvas import NOISE, Canvas, pick
from vlmexp.demo.pages import CLASSES, PageClass
from vlmexp.tables import write_json, write_table, write_text


def _counts(n: int, floor: int) -> list[int]:
    """Per-class counts: `floor` each, the rest by share (largest remainder), summing to n."""
    raw = [floor + c.share * (n - floor * len(CLASSES)) for c in CLASSES]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _render(seed: int, split: str, i: int, cls: PageClass) -> tuple[Image.Image, str]:
    rng = random.Random(f"{seed}:{split}:{i}")
    w, h = rng.randint(320, 400), rng.randint(400, 480)
    if rng.random() < 0.1:  # a few landscape tablet shots, e.g. 470 x 340
        w, h = rng.randint(440, 480), rng.randint(330, 360)
    c = Canvas(rng, w, h, (250, 250, 250))
    facts = cls.draw(c)
    for _ in range(rng.randint(0, 2)):  # stray words that mean nothing, e.g. "Deals" in a corner
        c.text((rng.randint(4, w - 60), rng.randint(30, h - 20)), pick(NOISE, rng), 11, fill=(170,) * 3)
    return c.img, rng.choice(cls.reasons).format(**facts)


def make_demo(
    out_dir: Path, seed: int = 0, n_train: int = 400, n_test: int = 200, hierarchy: bool = False
) -> Path:
    """Write the demo competition into `out_dir` and return it; same seed -> same bytes.

    `hierarchy=True` writes the two-level variant: the same images, labels.json nested as
    {parent: {child: description}} (PARENTS) and every label a full path, e.g. "money/refund_request".
    """
    if n_train < 2 * len(CLASSES) or n_test < len(CLASSES):
        raise ValueError(
            f"make_demo: need n_train >= {2 * len(CLASSES)} and n_test >= {len(CLASSES)} "
            f"to show every class; got {n_train} and {n_test}"
        )
    out = Path(out_dir)
    readme = out / "README.md"
    if (
        out.is_dir()
        and any(out.iterdir())
        and not (readme.is_file() and readme.read_text().startswith(TITLE))
    ):
        raise FileExistsError(f"make_demo: {out} is not empty and holds no demo; pick a new or empty folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    order = random.Random(f"{seed}:labels")
    tables, written = {}, set()
    for split, n, floor in (("train", n_train, 2), ("test", n_test, 1)):
        labels = [c.label for c, k in zip(CLASSES, _counts(n, floor), strict=True) for _ in range(k)]
        order.shuffle(labels)
        rows = []
        for i, label in enumerate(labels, 1):
            img, reason = _render(seed, split, i, next(c for c in CLASSES if c.label == label))
            name = f"images/{split}_{i:04d}.png"
            img.save(out / name, format="PNG", optimize=False, compress_level=1)
            written.add(name)
            rows.append({"id": f"{split}_{i:04d}", "image": name, "label": label, "reason": reason})
        tables[split] = pd.DataFrame(rows)
    for stale in (out / "images").glob("*_*.png"):  # a bigger earlier demo left more images
        if re.fullmatch(r"(train|test)_\d{4}\.png", stale.name) and f"images/{stale.name}" not in written:
            stale.unlink()
    train, test = tables["train"], tables["test"]
    full = {c.label: c.label for c in CLASSES}
    if hierarchy:
        full = {child: f"{parent}/{child}" for parent, children in PARENTS.items() for child in children}
        for table in (train, test):
            table["label"] = table["label"].map(full)
    write_table(train[["image", "label", "reason"]], out / "train.csv")
    write_table(test[["id", "image"]], out / "test.csv")
    write_table(test[["id", "label"]], out / "test_answers.csv")
    write_table(test[["id"]].assign(label=full[CLASSES[0].label]), out / "sample_submission.csv")
    describe = {c.label: c.description for c in CLASSES}
    if hierarchy:
        nested = {p: {child: describe[child] for child in children} for p, children in PARENTS.items()}
        write_json(nested, out / "labels.json")
    else:
        write_json(describe, out / "labels.json")
    note = HIERARCHY_NOTE.format(parents=", ".join(PARENTS)) if hierarchy else ""
    readme = README.format(n_train=n_train, n_test=n_test, seed=seed, k=len(CLASSES))
    write_text(readme + note, out / "README.md")
    return out


# The two-level variant (`exp demo --hierarchy`): the 12 classes under 4 parents, in labels.json order.
# Look-alike pairs stay siblings (payment/refund_request, order_details/invoice), so level 1 is easier.
PARENTS = {
    "browse": ["product_photo", "search_results", "shopping_cart", "优惠券"],
    "order": ["order_details", "invoice", "logistics_tracking"],
    "money": ["payment", "refund_request"],
    "account": ["login", "account_settings", "chat_support"],
}
HIERARCHY_NOTE = """
Two-level variant: labels.json nests the classes under the parents {parents}; every label in
train.csv and test_answers.csv is a full path parent/child, e.g. money/refund_request.
"""

TITLE = "# vlmexp demo competition"
README = (
    TITLE
    + """ (synthetic, seed {seed})

{k} classes of e-commerce app screenshots; {n_train} train and {n_test} test images in `images/`.

- `train.csv`: image, label, reason (the visible evidence for the label)
- `test.csv`: id, image; `test_answers.csv`: id, label (for scoring; a real competition hides these)
- `labels.json`: {{label: description}} in class order; `sample_submission.csv`: the submission format

payment/refund_request and order_details/invoice share layout and colours: only their words differ.
"""
)
