"""Two-level labels: a nested labels.json {parent: {child: description}} as full-path labels "parent/child".

Every class is the full path (data.hierarchy_sep joins the names), so training, scoring, the OOF and
test tables and the submission all work on plain labels; `Competition.tree` ({parent: [full paths]})
keeps the levels for the `hierarchy` prompt and for per-level scores (`metrics.level_scores`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from vlmexp.config import DataConfig

if TYPE_CHECKING:
    from vlmexp.data import CheckResult


def flatten(obj: dict, name: str, sep: str, out: CheckResult) -> dict[str, str] | None:
    """{parent: {child: description}} -> {"parent<sep>child": description}, filling `out.tree`.

    Every label then is a full path, e.g. "上衣/T恤", and scoring is joint over all full paths rather
    than child-under-parent: each candidate scored is a full path, so a child is only ever predicted
    with its own parent (the prediction always lies in the known tree) and its probability is one number
    over all classes, with no wrong first step to compound. Names holding the separator are refused: a
    child "T恤/长袖" under "上衣" would make "上衣/T恤/长袖", which reads as three levels.
    """
    flat = [k for k, v in obj.items() if not isinstance(v, dict)]
    if flat:
        msg = f"mixes flat labels ({', '.join(flat[:3])}) with parents that nest their children"
        fix = 'put every label under a parent, {"parent": {"child": "description"}}, or nest none'
        out.add(name, None, msg, fix)
        return None
    if not sep:
        out.add(name, None, "nests labels under parents but data.hierarchy_sep is empty", 'set it, e.g. "/"')
        return None
    labels: dict[str, str] = {}
    before = len(out.problems)
    for parent, children in obj.items():
        for what, key in [("parent", parent)] + [("child", c) for c in children]:
            if sep in key:
                msg = f"{what} name '{key}' contains the hierarchy separator '{sep}'"
                out.add(name, None, msg, "rename it, or pick another separator with data.hierarchy_sep")
            elif not key.strip():
                under = f" under '{parent}'" if what == "child" else ""
                out.add(name, None, f"an empty {what} name{under}", "give it a name")
        if not children:
            out.add(name, None, f"parent '{parent}' has no children", "give it at least one child or drop it")
        out.tree[parent] = [f"{parent}{sep}{child}" for child in children]
        labels |= {f"{parent}{sep}{child}": desc for child, desc in children.items()}
    if len(out.problems) > before:
        out.tree = {}
        return None
    return labels


def with_parents(train: pd.DataFrame, cfg: DataConfig) -> list[str]:
    """Full-path labels when train.csv names each row's parent in its own column (data.parent_col), e.g.
    category1/category2 as data.parent_col=category1 data.label_col=category2: "上衣" + "T恤" -> "上衣/T恤".

    A cell already written as a full path under its parent, or a row without a parent, stays as it is.
    """
    sep = cfg.hierarchy_sep

    def join(parent: str, child: str) -> str:
        if not parent.strip() or not child.strip() or child.startswith(parent + sep):
            return child
        return f"{parent}{sep}{child}"

    return [join(p, c) for p, c in zip(train[cfg.parent_col], train[cfg.label_col], strict=True)]


def paths_of_children(tree: dict[str, list[str]], sep: str) -> dict[str, list[str]]:
    """{child name: its full paths}, e.g. {"T恤": ["上衣/T恤"]}: a row labelled "T恤" alone is told which."""
    paths: dict[str, list[str]] = {}
    for full in (label for children in tree.values() for label in children):
        paths.setdefault(full.split(sep, 1)[1], []).append(full)
    return paths
