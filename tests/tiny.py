"""Tiny random models of every supported family, built from config objects (odd sizes)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

HIDDEN, HEADS, INTER, LAYERS, VOCAB = 24, 4, 60, 2, 97
FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet")


def tiny_config(model_type: str, num_labels: int = 3):
    common = dict(vocab_size=VOCAB, num_labels=num_labels, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    bert_like = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=INTER, max_position_embeddings=72, **common)
    if model_type == "bert":
        return transformers.BertConfig(**bert_like)
    if model_type == "roberta":
        return transformers.RobertaConfig(pad_token_id=1, **bert_like)
    if model_type == "xlm-roberta":
        return transformers.XLMRobertaConfig(pad_token_id=1, **bert_like)
    if model_type == "electra":
        return transformers.ElectraConfig(embedding_size=16, **bert_like)
    if model_type == "mpnet":
        return transformers.MPNetConfig(pad_token_id=1, **bert_like)
    if model_type == "distilbert":
        return transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTER,
            max_position_embeddings=72, num_labels=num_labels, dropout=0.0,
            attention_dropout=0.0, seq_classif_dropout=0.0)
    raise ValueError(model_type)


def tiny_model(model_type: str = "bert", num_labels: int = 3, seed: int = 0, qa: bool = False):
    """A random task model; weights are scaled up so every matrix matters in the logits."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, num_labels)
    cls = transformers.AutoModelForQuestionAnswering if qa else \
        transformers.AutoModelForSequenceClassification
    model = cls.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "LayerNorm" not in name and "norm" not in name:
                p.normal_(0, 0.2)
            elif p.ndim == 2 and "embeddings" not in name:
                p.normal_(0, 0.3)
    return model.eval()


def save_tiny_bert(folder, tokenizer_path: str, model_class=transformers.BertModel,
                   **config_overrides):
    """A tiny random BERT (2 labels) saved like a hub checkpoint, with the tokenizer at
    ``tokenizer_path`` (its vocabulary size), for the CLI and end-to-end tests."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
    config = tiny_config("bert", num_labels=2)
    config.vocab_size = tok.vocab_size
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_batch(n: int = 3, length: int = 11, seed: int = 0, labels: int | None = 3) -> dict:
    """Random token ids with a padded tail on one row (attention mask exercised)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length - 4:] = 0
    ids[0, length - 4:] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels:
        batch["labels"] = torch.randint(0, labels, (n,), generator=g)
    return batch


def random_scores(model, seed: int = 0, weak: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Random importance per matrix; sublayers named in ``weak`` ("0.ffn") get tiny scores."""
    from pgb.arch import SUBLAYERS, get_matrix
    from pgb.importance import matrix_names

    rng = np.random.default_rng(seed)
    out = {}
    for name in matrix_names(model):
        layer, role = name.split(".")
        kind = next(k for k, roles in SUBLAYERS.items() if role in roles)
        shape = get_matrix(model, int(layer), role).weight.shape
        scale = 1e-9 if f"{layer}.{kind}" in weak else 1.0
        out[name] = torch.from_numpy(rng.random(tuple(shape)) ** 3 * scale)
    return out
