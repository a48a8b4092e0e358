"""Token-length buckets: the widths compiled steps see come from a small fixed ladder.

A compiled decoder layer (speed.compile, static shapes) compiles once per batch shape. Padding every
batch to a multiple of 64 tokens still gives one width per 64 tokens of spread (a run of 400-2000
token rows: 26), so dynamo hit its recompile limit (8) in fold 0 of a 3B demo run on an H200 and fell
back to eager. `bucket_width` rounds a width up to a ladder of 4 steps per doubling, each a multiple
of 64: 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, ... Above 256 tokens at most
25% of a batch's width is padding (9% on average over 256-4096), and 1-4096 tokens take 20 widths,
1-8192 take 24 (multiples of 64: 64 and 128): every shape a run
meets is compiled in its first fold, later folds recompile nothing. Padding is masked and carries
label -100, so the loss is the same (tests/test_buckets.py).

The batch dimension is a shape too: a fold's last batch is short (320 rows at batch 24: 8 rows), and
folds of different sizes give different short batches. `fill_rows` tops a short batch up with copies
of its first row whose labels are all -100: the compiled step sees the full batch's shape, the copies
add nothing to the loss or the gradients (the loss counts supervised tokens only), only their compute.

Used by the training collator when speed.compile is on (engine/train.py): widths through
`batching.pad_rows`, rows through `fill_rows`. Prediction runs the layers eagerly
(`compile.eager_blocks`): a forward with a KV cache recompiles per layer whatever its widths.
"""

from __future__ import annotations

import torch

STEP = 64  # the smallest step; also every width's divisor (tensor-core friendly)
PER_OCTAVE = 4  # widths per doubling above STEP * PER_OCTAVE tokens


def bucket_width(n: int) -> int:
    """The smallest ladder width >= n, e.g. 570 -> 640, 300 -> 320, 1025 -> 1280."""
    if n <= STEP * PER_OCTAVE:
        return max(STEP, -(-n // STEP) * STEP)
    octave = 1 << (n - 1).bit_length() - 1  # the power of two below n: 512 for 570
    step = octave // PER_OCTAVE
    return -(-n // step) * step


def widths(up_to: int) -> list[int]:
    """Every ladder width a batch of at most `up_to` tokens can get: widths(512)[:4] = [64, 128, 192, 256]."""
    return sorted({bucket_width(n) for n in range(1, up_to + 1)})


def fill_rows(rows: list[dict], size: int) -> list[dict]:
    """`rows` (encoded training rows) topped up to `size` with label-masked copies of the first row."""
    if len(rows) >= size:
        return rows
    filler = dict(rows[0], labels=torch.full_like(rows[0]["labels"], -100))
    return rows + [filler] * (size - len(rows))
