"""Paired bootstrap + McNemar (vlmexp.report's own functions) between two prediction tables.

usage: python paired.py A.csv B.csv [answers.csv]   (pred column `pred` or `label` of a submission)
"""

import sys

import pandas as pd

from vlmexp.report import mcnemar, paired_bootstrap

a, b = pd.read_csv(sys.argv[1]), pd.read_csv(sys.argv[2])
if len(sys.argv) > 3:  # test: submissions (id,label) against the hidden answers
    ans = pd.read_csv(sys.argv[3]).rename(columns={"label": "y"})
    a = ans.merge(a.rename(columns={"label": "pred"}), on="id")
    b = ans.merge(b.rename(columns={"label": "pred"}), on="id")
    y = a["y"]
else:
    b = a[["id"]].merge(b, on="id")
    y = a["label"]
labels = sorted(set(y))
for m in ("macro_f1", "accuracy"):
    d, lo, hi = paired_bootstrap(y, a["pred"], b["pred"], labels=labels, metric=m)
    print(f"{m}: delta {d:+.4f} (95% CI {lo:+.4f}, {hi:+.4f}), n={len(y)}")
bb, c, _, p = mcnemar(y, a["pred"], b["pred"])
print(f"McNemar b/c {bb}/{c}, p={p:.3g}")
