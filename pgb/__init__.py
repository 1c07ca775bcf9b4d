"""pgb: one-shot pruning of fine-tuned BERT-family models by weight grouping and permutation."""

__version__ = "0.1.0"
