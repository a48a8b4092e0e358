"""Python's cyclic garbage collector told which objects live for the whole run (`speed.freeze_heap`).

A full collection walks every tracked object, and after torch, transformers and trl are imported that
is about a million of them (modules, functions, classes), none of which will ever be garbage. A fold
allocates enough Python objects (trainer, callbacks, batches, logs) to set off full collections
during training, and the recipe's own `gc.collect()` between training and prediction is one too.
On a CPU run of the tiny model (`exp bench run --model tiny:qwen2_5_vl --folds 3 --epochs 2
--train-rows 96 --test-rows 48 --set speed.freeze_heap=false`, then `=true`) collections took 2.6 s of
the run's 10.6, and 0.5 s of 7.6 with the long-lived objects frozen (the bench's "gc" figure).

`gc.freeze()` moves every object alive at that moment to a permanent generation the collector skips.
`fold_start()` is called at the start of each fold, before the fold's model is loaded: it collects
what the last fold left, then freezes what is still alive: the imports, the run's data, caches and
samples, and from fold 1 on a base model shared by the folds. Objects made afterwards (the fold's
adapter, trainer, optimizer, or its own model when the base is not shared) are collected as usual.
Reference counting still frees frozen objects without cycles at once; frozen cycles wait for
`thaw()`, which the recipe calls when a run's folds end (also on an error) and a worker calls before
it prepares another run, so a finished run's base weights are not kept alive by the freeze.
"""

from __future__ import annotations

import gc


def fold_start(enabled: bool) -> None:
    """Collect what earlier folds left, then freeze everything still alive (see the module docstring)."""
    if not enabled:
        return
    gc.collect()  # over the unfrozen objects only: cheap after the first fold
    gc.freeze()


def thaw() -> None:
    """Back to plain collection (the run's folds are done): frozen cycles become collectable again."""
    gc.unfreeze()
