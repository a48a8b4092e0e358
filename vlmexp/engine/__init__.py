"""One fold's engine: rows -> samples (`samples`), SFT with trl (`train`), label probabilities (`predict`).

Import the submodules directly (`from vlmexp.engine.train import train_fold`): `train` pulls in trl,
which costs seconds, and `samples` alone should stay cheap to import.
"""
