"""GenEval (Ghosh et al. 2023): object detection + colour classification + rules. See rules.py and scorer.py."""
