"""Prompt variants (Jinja templates), chat messages, answer parsing and prompt checks."""

from vlmexp.prompts.checks import label_restating_share, long_prompts, near_duplicate_share, prompt_stats
from vlmexp.prompts.render import (
    PromptError,
    PromptTemplate,
    Rendered,
    answer_prefix_and_label,
    available_templates,
    load_template,
    parse_answer,
    render_sample,
    to_messages,
)

__all__ = [
    "PromptError",
    "PromptTemplate",
    "Rendered",
    "answer_prefix_and_label",
    "available_templates",
    "label_restating_share",
    "load_template",
    "long_prompts",
    "near_duplicate_share",
    "parse_answer",
    "prompt_stats",
    "render_sample",
    "to_messages",
]
