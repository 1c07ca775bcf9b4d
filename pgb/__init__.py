"""pgb: one-shot pruning of fine-tuned BERT-family models by weight grouping and permutation.

Python API::

    import pgb
    model = pgb.load("runs/sst2-pgb50")          # compact model, no re-pruning
    dense = pgb.densify(model)                     # its masked dense twin
    result = pgb.compress(teacher, tokenizer, task, config, data)
"""

__version__ = "0.1.0"


def load(folder):
    """Rebuild a compressed model from a pgb output folder (see ``pgb.checkpoint.load``)."""
    from .checkpoint import load as _load

    return _load(folder)


def densify(model):
    """The masked dense twin of a compact model (see ``pgb.surgery.densify``)."""
    from .surgery import densify as _densify

    return _densify(model)


def compress(teacher, tokenizer, task, config, data, **kwargs):
    """Compress a fine-tuned teacher (see ``pgb.pipeline.run_method``)."""
    from .pipeline import run_method

    return run_method(teacher, tokenizer, task, config, data, **kwargs)
