"""Evaluation beyond test accuracy, after "Lost in Pruning" (Liebenwein et al., MLSys 2021).

`corruptions` (ImageNet-C-family corruptions and a held-out shift on tensors), `metrics`
(agreement, excess error, prune potential), `evaluation` (`evaluate_run`), `compare`
(`compare_runs`) and `commands` (the CLI verbs). Submodules are imported explicitly so that the
command line starts without loading torch or matplotlib.
"""
