"""Summarise a py-spy `record --format raw` file: where the main thread's wall time goes.

Made to attribute a whole K-fold run's wall time (scripts/device_bench.sh run-profile): for each
anchor function, the seconds under it split by the frame directly below its outermost occurrence
and by leaf frame, and the seconds spent under _run_folds/run_once but not under run_fold.

Each raw line is `frame;frame;...;frame COUNT`, root first; frames read `func (file.py:LINE)`; with
`--threads` the first frame(s) label the thread (`thread (0x...)`, optionally `: NAME`, or
`process ...`). Seconds = samples / rate (py-spy's -r; record with --idle so waits count too).
Lines that do not parse are skipped and counted.

    python3 scripts/pyspy_summary.py run-profile.txt [--rate 50] [--anchors a,b,...] [--top 12]
"""

import argparse
import functools
import re
from collections import Counter, defaultdict

ANCHORS = (
    "run_fold,train_fold,_predict,predict,prepass_fold,Trainer._run_epoch,_save_checkpoint,"
    "_load_best_model,BaseModel.for_training,EvalCallback.metrics,score_completions,"
    "_run_folds,finalize,prepare"
)
LABEL = re.compile(r"^(thread \(|process )")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")


@functools.cache
def func_of(frame: str) -> str:
    m = FRAME.match(frame)
    return m.group("func") if m else frame


def matches(func: str, anchor: str) -> bool:
    """Match by function name; a class-qualified name on either side matches its bare method name."""
    if func == anchor:
        return True
    if "." in func and "." in anchor:
        return False
    return func.rsplit(".", 1)[-1] == anchor.rsplit(".", 1)[-1]


def leaf(stack: tuple) -> str:
    """The leaf frame, with the innermost project (vlmexp/) frame above it as its call site."""
    ours = next((fr for fr in reversed(stack[:-1]) if "vlmexp/" in fr), None)
    return stack[-1] + (f"  <- {ours}" if ours else "")


def read(path: str):
    """{thread label: Counter(stack tuple -> samples)}, skipped line count."""
    threads, bad = defaultdict(Counter), 0
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                bad += 1
                continue
            frames = stack.split(";")
            labels = []
            while frames and LABEL.match(frames[0]):
                labels.append(frames.pop(0))
            threads[";".join(labels) or "(no label)"][tuple(frames)] += int(count)
    return threads, bad


def main_thread(threads: dict) -> str:
    named = [t for t in threads if "MainThread" in t]
    if named:
        return max(named, key=lambda t: sum(threads[t].values()))

    def score(t):  # samples whose root is the interpreter's main module
        return sum(
            n for s, n in threads[t].items() if s and func_of(s[0]) in ("<module>", "_run_module_as_main")
        )

    return max(threads, key=lambda t: (score(t), sum(threads[t].values())))


def show(title: str, counter: Counter, rate: float, top: int) -> None:
    total = sum(counter.values())
    print(f"  {title} (top {top} of {len(counter)}):")
    for key, n in counter.most_common(top):
        print(f"    {n / rate:9.2f} s {100 * n / max(total, 1):5.1f}%  {key}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raw", help="py-spy --format raw output")
    p.add_argument("--rate", type=float, default=50.0, help="py-spy sampling rate (-r), samples/s")
    p.add_argument("--anchors", default=ANCHORS, help="comma-separated function names")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--thread", help="substring of the thread label to use instead of the main thread")
    a = p.parse_args()
    threads, bad = read(a.raw)
    if not threads:
        raise SystemExit(f"no parsable lines in {a.raw} ({bad} skipped)")
    print(f"file {a.raw}: {len(threads)} thread label(s), {bad} unparsable line(s) skipped")
    for t, c in sorted(threads.items(), key=lambda kv: -sum(kv[1].values()))[:8]:
        print(f"  {sum(c.values()) / a.rate:9.2f} s  {t}")
    tid = next((t for t in threads if a.thread in t), None) if a.thread else main_thread(threads)
    stacks = threads[tid]
    total = sum(stacks.values())
    print(f"\nmain thread: {tid}\ntotal {total / a.rate:.2f} s ({total} samples at {a.rate:g}/s)")

    for anchor in [x.strip() for x in a.anchors.split(",") if x.strip()]:
        below, leaves, n_under = Counter(), Counter(), 0
        for s, n in stacks.items():
            i = next((i for i, fr in enumerate(s) if matches(func_of(fr), anchor)), None)
            if i is None:
                continue
            n_under += n
            below[s[i + 1] if i + 1 < len(s) else "<self>"] += n
            leaves[leaf(s)] += n
        print(f"\n== {anchor}: {n_under / a.rate:.2f} s ({100 * n_under / max(total, 1):.1f}% of main)")
        if n_under:
            heads = {fr for s in stacks for fr in s if matches(func_of(fr), anchor)}
            print("  frames: " + " | ".join(sorted(heads))[:300])
            show("by frame below", below, a.rate, a.top)
            show("by leaf", leaves, a.rate, a.top)

    outside = Counter()
    for s, n in stacks.items():
        if any(matches(func_of(fr), "run_fold") for fr in s):
            continue
        idx = [i for i, fr in enumerate(s) if func_of(fr) in ("_run_folds", "run_once")]
        if idx:  # the innermost of the two, so run_once -> _run_folds does not hide the split
            outside[s[idx[-1] + 1] if idx[-1] + 1 < len(s) else "<self>"] += n
    print(f"\n== under _run_folds/run_once, not under run_fold: {sum(outside.values()) / a.rate:.2f} s")
    show("by frame below", outside, a.rate, 15)
    no_run = sum(n for s, n in stacks.items() if not any(func_of(fr) == "run_once" for fr in s))
    print(f"\n== main thread outside run_once: {no_run / a.rate:.2f} s")


if __name__ == "__main__":
    main()
