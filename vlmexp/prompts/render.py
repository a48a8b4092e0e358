"""Prompt variants as Jinja templates: load one, render a data row, build chat messages, parse answers.

A variant is `templates/<name>.jinja`, or `<cfg.prompts.dir>/<name>.jinja` (searched first, so a user
file adds a name or overrides a shipped one). It defines three blocks, `system`, `user` and `answer`,
and sets at its top level the marker that precedes the label on the answer's last line:
`{% set marker = "Label: " %}`, or `{% set marker = "" %}` when the answer is the label alone.
It may `{% extends "baseline.jinja" %}` and override single blocks; `"shipped/baseline.jinja"` names
the shipped file even where the user folder overrides it.

Variables: `labels` (class order), `descriptions` ({label: text}), `label_descriptions_json`,
`ocr_text` ("" when OCR is off), `marker`, `row` (the data row) and each row column by name.
Two-level labels (a nested labels.json) add `label_tree`, {parent: [full-path labels]}, e.g.
{"money": ["money/payment", "money/refund_request"]}, and `label_tree_json`, {parent: {label:
description}}; both are empty ({} and "") for flat labels, so a template can fall back on `labels`.
`label` and `reason` exist in the answer block only: both come from the gold label, so in the prompt
they would leak the answer to the model, and a test row has neither.

Each block renders on its own, and no top-level code other than `extends` and the marker runs, so a
template's top level holds only those and blocks (a macro goes into a file that a block imports).
Data (OCR text, reasons, descriptions) enters as values and is never rendered as template source.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes

SHIPPED_DIR = Path(__file__).parent / "templates"
BLOCKS = ("system", "user", "answer")
# Names the renderer defines; a row column of the same name stays reachable as row["<name>"].
RESERVED = {
    "labels",
    "descriptions",
    "label_descriptions_json",
    "label_tree",
    "label_tree_json",
    "ocr_text",
    "row",
    "marker",
    "label",
    "reason",
}
GOLD_ONLY = ("label", "reason")


class PromptError(ValueError):
    """A prompt template problem the user must fix; the message says which file and how."""


@dataclass(frozen=True)
class Rendered:
    system: str
    user: str
    answer: str  # "" when rendered with with_answer=False
    marker: str  # e.g. "Label: "; "" for label-only answers
    label: str = ""  # the gold label the answer ends with ("" when not rendered)


@dataclass(frozen=True, eq=False)
class PromptTemplate:
    name: str  # e.g. "label_desc"
    path: Path  # the file that defines it
    source: str  # its text, saved into the run folder as prompt.jinja
    marker: str
    template: jinja2.Template
    parents: list[jinja2.Template] = field(default_factory=list)  # extends chain, nearest first
    sources: dict[str, str] = field(default_factory=dict)  # {file name: text} of the whole chain
    block_files: dict[str, str] = field(default_factory=dict)  # {block: file that defines it}


def _tojson(value: Any, indent: int | None = None) -> str:
    # Jinja's own tojson escapes for HTML and writes "\u9000" for CJK; prompts want the text itself.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _sentences(text: str) -> list[str]:
    """'Red tag. Big logo! 退款。页面' -> ['Red tag.', 'Big logo!', '退款。', '页面'] (for cot steps)."""
    parts = re.split(r"(?<=[.!?])\s+|(?<=[。！？])|\n+", text or "")
    return [p.strip() for p in parts if p.strip()]


def _environment(user_dir: str) -> jinja2.Environment:
    dirs = [str(user_dir), str(SHIPPED_DIR)] if user_dir else [str(SHIPPED_DIR)]
    loader = jinja2.ChoiceLoader(
        [
            jinja2.FileSystemLoader(dirs),
            jinja2.PrefixLoader({"shipped": jinja2.FileSystemLoader(str(SHIPPED_DIR))}),
        ]
    )
    env = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        # Block tags on their own line leave no blank line behind, so templates can be indented.
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["tojson"] = _tojson
    env.filters["sentences"] = _sentences
    return env


def available_templates(user_dir: str = "") -> list[str]:
    """Variant names: shipped plus the user folder's; files starting with "_" are helpers, not variants."""
    dirs = [SHIPPED_DIR] + ([Path(user_dir)] if user_dir else [])
    return sorted(
        {p.stem for d in dirs if d.is_dir() for p in d.glob("*.jinja") if not p.name.startswith("_")}
    )


def _top_level(env: jinja2.Environment, name: str) -> tuple[str | None, str | None, str]:
    """(parent name, marker, source) of one file; refuses top-level code that would not run."""
    # By the name asked for, not Template.name: PrefixLoader names "shipped/baseline.jinja" "baseline.jinja".
    source, filename, _ = env.loader.get_source(env, name)
    parent = marker = None
    for node in env.parse(source, name, filename).body:
        where = f"{filename}:{node.lineno}"
        if isinstance(node, nodes.Extends):
            if not isinstance(node.template, nodes.Const):
                raise PromptError(
                    f'{where}: extends needs a literal name, e.g. {{% extends "baseline.jinja" %}}'
                )
            parent = node.template.value
        elif isinstance(node, nodes.Assign) and getattr(node.target, "name", None) == "marker":
            if not (isinstance(node.node, nodes.Const) and isinstance(node.node.value, str)):
                raise PromptError(
                    f'{where}: the marker must be a string literal, e.g. {{% set marker = "Label: " %}}'
                )
            marker = node.node.value
        elif isinstance(node, nodes.Output) and all(
            isinstance(n, nodes.TemplateData) and not n.data.strip() for n in node.nodes
        ):
            continue
        elif not isinstance(node, nodes.Block):
            raise PromptError(
                f"{where}: only {{% extends %}}, {{% set marker = ... %}} and blocks may stand outside "
                "a block; move this into the system, user or answer block"
            )
    return parent, marker, source


def load_template(name: str, user_dir: str = "") -> PromptTemplate:
    """The variant `name` (e.g. "label_desc"), from `user_dir` first, then the shipped templates."""
    name = name.removesuffix(".jinja")
    if user_dir and not Path(user_dir).is_dir():
        raise PromptError(f"prompts.dir={user_dir!r} is not a folder; point it at a folder of .jinja files")
    have = available_templates(user_dir)
    if name not in have:
        raise PromptError(f"prompt={name!r}: no such template; available: {', '.join(have)}")
    env = _environment(user_dir)
    chain: list[jinja2.Template] = []
    sources: dict[str, str] = {}
    marker = None
    next_name: str | None = f"{name}.jinja"
    while next_name is not None:
        if next_name in sources:
            raise PromptError(
                f"{name}: extends loops back to {next_name}; to extend the shipped file that a user file "
                f'overrides, write {{% extends "shipped/{next_name}" %}}'
            )
        tpl = env.get_template(next_name)
        this_name = next_name
        next_name, own_marker, sources[this_name] = _top_level(env, this_name)
        marker = own_marker if marker is None else marker  # the nearest file's marker wins
        chain.append(tpl)
    block_files: dict[str, str] = {}
    for tpl in chain:
        for block in tpl.blocks:
            block_files.setdefault(block, tpl.filename or tpl.name)
    missing = [b for b in BLOCKS if b not in block_files]
    if missing or marker is None:
        what = [f"block(s) {', '.join(missing)}"] * bool(missing) + ['{% set marker = "..." %}'] * (
            marker is None
        )
        raise PromptError(
            f"{chain[0].filename}: defines no {' and no '.join(what)}; see templates/baseline.jinja"
        )
    return PromptTemplate(
        name=name,
        path=Path(chain[0].filename or name),
        source=sources[f"{name}.jinja"],
        marker=marker,
        template=chain[0],
        parents=chain[1:],
        sources=sources,
        block_files=block_files,
    )


def _clean(value: Any) -> Any:
    """Missing cells (None, NaN, pd.NA) become "" so that `{% if reason %}` and printing behave."""
    if value is None or (isinstance(value, float) and value != value) or type(value).__name__ == "NAType":
        return ""
    return value


def _render_block(tpl: PromptTemplate, block: str, variables: dict[str, Any]) -> str:
    ctx = tpl.template.new_context(variables)
    for parent in tpl.parents:  # what the compiled `extends` does: parents' blocks after the child's
        for name, fn in parent.blocks.items():
            ctx.blocks.setdefault(name, []).append(fn)
    try:
        return "".join(ctx.blocks[block][0](ctx)).strip()
    except jinja2.UndefinedError as e:
        raise PromptError(_undefined_message(tpl, block, variables, e.message or "")) from e
    except jinja2.TemplateError as e:
        raise PromptError(
            f"prompt template {tpl.name!r} ({tpl.block_files[block]}), block {block!r}: {e}"
        ) from e


def _undefined_message(tpl: PromptTemplate, block: str, variables: dict[str, Any], message: str) -> str:
    head = f"prompt template {tpl.name!r} ({tpl.block_files[block]}), block {block!r}: {message}."
    m = re.search(r"'([^']+)' is undefined", message)
    if m and m.group(1) in GOLD_ONLY and block != "answer":
        return (
            f"{head} `{m.group(1)}` exists in the answer block only: it comes from the gold label, so in the "
            "prompt it would leak the answer, and test rows have none. Remove it from this block."
        )
    names = ", ".join(sorted(k for k in variables if k != "row"))
    columns = ", ".join(variables["row"])
    return (
        f"{head} Variables here: {names}; row columns: {columns}. Use one of these, or guard an optional "
        "one with {% if NAME is defined %}."
    )


def _tree_json(tree: Mapping[str, list[str]], descriptions: dict[str, str]) -> str:
    """The tree with each label's description, e.g. {"money": {"money/payment": "A checkout form"}};
    "" for flat labels, so `{% if label_tree_json %}` tells the two apart."""
    if not tree:
        return ""
    return _tojson({p: {c: descriptions.get(c, "") for c in cs} for p, cs in tree.items()}, indent=2)


def render_sample(
    tpl: PromptTemplate,
    *,
    labels: list[str],
    descriptions: Mapping[str, str],
    row: Mapping[str, Any],
    ocr_text: str = "",
    with_answer: bool = True,
    tree: Mapping[str, list[str]] | None = None,
) -> Rendered:
    """Render one data row; the answer (which needs row["label"]) only when `with_answer`.

    `tree`: `Competition.tree` for two-level labels ({parent: [full-path labels]}); None or {} when flat.
    """
    full_row = {str(k): _clean(v) for k, v in dict(row).items()}
    prompt_row = {k: v for k, v in full_row.items() if k not in GOLD_ONLY}
    ordered = {label: str(_clean(descriptions.get(label, ""))) for label in labels}
    variables: dict[str, Any] = {
        k: v for k, v in prompt_row.items() if k.isidentifier() and k not in RESERVED
    }
    variables |= {
        "labels": list(labels),
        "descriptions": ordered,
        "label_descriptions_json": _tojson(ordered, indent=2),
        "label_tree": {parent: list(children) for parent, children in (tree or {}).items()},
        "label_tree_json": _tree_json(tree or {}, ordered),
        "ocr_text": str(_clean(ocr_text)).strip(),
        "marker": tpl.marker,
        "row": prompt_row,
    }
    system = _render_block(tpl, "system", variables)
    user = _render_block(tpl, "user", variables)
    if not with_answer:
        return Rendered(system=system, user=user, answer="", marker=tpl.marker)
    label = str(full_row.get("label", ""))
    if label not in labels:
        raise PromptError(
            f"row {full_row.get('id', '?')!r}: label {label!r} is not one of the {len(labels)} labels; "
            "fix the data, or render with with_answer=False for rows without a label"
        )
    reason = str(full_row.get("reason", "")).strip()
    answer = _render_block(tpl, "answer", variables | {"row": full_row, "label": label, "reason": reason})
    return Rendered(system=system, user=user, answer=answer, marker=tpl.marker, label=label)


def to_messages(r: Rendered, n_images: int = 1, with_answer: bool = True) -> list[dict]:
    """trl/HF multimodal chat: [system], user (images, then text), [assistant answer]."""
    if with_answer and not r.answer:
        raise PromptError(
            "to_messages(with_answer=True) needs an answer: render_sample(..., with_answer=True)"
        )
    messages = [{"role": "system", "content": [{"type": "text", "text": r.system}]}] if r.system else []
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": r.user}]
    messages.append({"role": "user", "content": content})
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": r.answer}]})
    return messages


def answer_prefix_and_label(r: Rendered) -> tuple[str, str]:
    """Split the answer into (reasoning + marker, label), e.g. ("Reason: red tag\\nLabel: ", "sale").

    For scoring, tokenise prefix + label as one text and find the label's tokens by character offset:
    BPE often merges the marker's trailing space into the label's first token (" sale").
    """
    if not r.answer:
        raise PromptError("answer not rendered: render_sample(..., with_answer=True)")
    at = r.answer.rfind(r.marker) if r.marker else 0  # rfind("") would give len(answer)
    if at < 0:
        raise PromptError(
            f"answer {r.answer[-80:]!r} has no marker {r.marker!r}; the answer block must end with it"
        )
    cut = at + len(r.marker)
    prefix, label = r.answer[:cut], r.answer[cut:]
    if (r.label and label != r.label) or not label or "\n" in label:
        raise PromptError(
            f"answer must end with marker + label ({r.marker + r.label!r}), got {r.answer[-80:]!r}; "
            "make the answer block end with {{ marker }}{{ label }}"
        )
    return prefix, label


def normalise(text: str) -> str:
    """Loose form for matching: '  "Refund_Page." ' -> 'refund page' (NFKC, casefold, edges stripped)."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("_", " ")
    text = " ".join(text.split())
    edge = lambda c: c.isspace() or c in "*`~" or unicodedata.category(c).startswith("P")  # noqa: E731
    start, end = 0, len(text)
    while start < end and edge(text[start]):
        start += 1
    while end > start and edge(text[end - 1]):
        end -= 1
    return text[start:end]


def parse_answer(text: str, labels: list[str], marker: str) -> str | None:
    """The label after the last `marker` (the whole text when marker is ""), else None.

    Exact match first, then a unique match after `normalise`; no nearest-label guessing, so a parse
    failure stays visible. Labels never span lines: the first non-empty line after the marker counts.
    The marker matches case-insensitively and without its trailing space ("label:cat" parses).
    """
    rest = text or ""
    if marker.strip():
        found = list(re.finditer(re.escape(marker.strip()), rest, flags=re.IGNORECASE))
        if not found:
            return None
        rest = rest[found[-1].end() :]
    lines = [line.strip() for line in rest.splitlines() if line.strip()]
    if not lines:
        return None
    candidate = lines[0]
    if candidate in labels:
        return candidate
    key = normalise(candidate)
    hits = [label for label in labels if normalise(label) == key]
    return hits[0] if len(hits) == 1 else None
