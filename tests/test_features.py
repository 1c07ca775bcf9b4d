"""Featurisation: tokenising splits, sliding QA windows, dynamic padding, reproducible shuffle."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from pgb.data import load_split
from pgb.features import PadCollator, answer_token_span, encode, make_loader
from pgb.tasks import get_task

MODEL_KEYS = {"input_ids", "token_type_ids", "attention_mask"}


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def pairs_frame(n: int = 10) -> pd.DataFrame:
    return pd.DataFrame({
        "sentence1": [("word " * (i + 1)).strip() for i in range(n)],
        "sentence2": ["the other sentence"] * n,
        "label": [i % 2 for i in range(n)],
    })


def qa_frame(context: str, question: str, answer: str) -> pd.DataFrame:
    start = context.index(answer)
    return pd.DataFrame({"id": ["q0"], "title": ["t"], "context": [context],
                         "question": [question],
                         "answers": [{"text": [answer], "answer_start": [start]}]})


def test_encode_single_sentences_unpadded(tokenizer):
    df = pd.DataFrame({"sentence": ["a fine film", "dull"], "label": [1, 0]})
    enc = encode(get_task("sst2"), df, tokenizer)
    assert len(enc) == 2 and enc.num_examples == 2
    assert enc.inputs["input_ids"][1] == [101, 10634, 102]  # [CLS] dull [SEP], no padding
    assert enc.inputs["labels"] == [1, 0]
    assert enc.labels.tolist() == [1, 0]


def test_encode_pairs_truncates(tokenizer):
    enc = encode(get_task("mrpc"), pairs_frame(), tokenizer, max_length=8)
    assert max(len(ids) for ids in enc.inputs["input_ids"]) == 8
    assert 1 in enc.inputs["token_type_ids"][0]  # second segment marked


def test_loader_pads_per_batch(tokenizer):
    enc = encode(get_task("mrpc"), pairs_frame(), tokenizer)
    batches = list(make_loader(enc, batch_size=4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    first = batches[0]
    assert set(first) == MODEL_KEYS | {"labels"}
    lengths = [len(ids) for ids in enc.inputs["input_ids"][:4]]
    assert first["input_ids"].shape == (4, max(lengths))
    assert first["attention_mask"].sum(1).tolist() == lengths
    assert first["input_ids"][0, lengths[0]:].tolist() == [tokenizer.pad_token_id] * (
        max(lengths) - lengths[0])
    assert first["labels"].dtype == torch.int64


def test_regression_labels_are_float32(tokenizer):
    df = pairs_frame(3).assign(label=[0.5, 2.0, 4.75])
    batch = next(iter(make_loader(encode(get_task("stsb"), df, tokenizer), batch_size=3)))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [0.5, 2.0, 4.75]


def test_left_padding_collator():
    batch = PadCollator(pad_token_id=7, padding_side="left")(
        [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]},
         {"input_ids": [4], "attention_mask": [1]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 7, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_shuffle_is_reproducible_from_seed(tokenizer):
    enc = encode(get_task("mrpc"), pairs_frame(40), tokenizer)

    def order(seed):
        return [len_ for b in make_loader(enc, 8, shuffle=True, seed=seed)
                for len_ in b["attention_mask"].sum(1).tolist()]

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == sorted(len(ids) for ids in enc.inputs["input_ids"])


def test_real_sst2_batch_runs_through_tiny_bert(tokenizer, shared_data):
    df = load_split(get_task("sst2"), "validation", data_dir=shared_data, max_samples=16)
    batch = next(iter(make_loader(encode(get_task("sst2"), df, tokenizer), batch_size=16)))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=37, num_labels=2)
    torch.manual_seed(0)
    out = BertForSequenceClassification(config).eval()(**batch)
    assert out.logits.shape == (16, 2)
    assert torch.isfinite(out.loss)


def test_qa_train_positions_point_at_the_answer(tokenizer):
    context = "The Eiffel Tower stands in Paris. " + "It is tall and made of iron. " * 30
    df = qa_frame(context, "Where is the tower?", "Paris")
    enc = encode(get_task("squad"), df, tokenizer, max_length=64, doc_stride=16, train=True)
    assert len(enc) > 3  # several windows over the long context
    assert enc.example_ids == ["q0"] * len(enc)
    s, e = enc.inputs["start_positions"][0], enc.inputs["end_positions"][0]
    assert tokenizer.decode(enc.inputs["input_ids"][0][s:e + 1]) == "paris"
    assert enc.inputs["start_positions"][-1] == enc.inputs["end_positions"][-1] == 0  # CLS
    assert enc.offsets is None


def test_qa_eval_keeps_context_offsets(tokenizer):
    df = qa_frame("Paris is the capital of France.", "What is the capital?", "Paris")
    enc = encode(get_task("squad"), df, tokenizer, max_length=384, train=False)
    assert len(enc) == 1 and set(enc.inputs) == MODEL_KEYS
    offs = enc.offsets[0]
    n_question = len(tokenizer("What is the capital?")["input_ids"])  # [CLS] q [SEP]
    assert offs[:n_question] == [None] * n_question
    assert offs[n_question] == (0, 5) and offs[-1] is None  # "paris", final [SEP]
    assert enc.contexts["q0"].startswith("Paris") and enc.answers == {"q0": ["Paris"]}


def test_answer_token_span_known_answer():
    offsets = [(0, 0), (0, 3), (0, 0), (0, 3), (4, 7), (0, 0)]
    seq_ids = [None, 0, None, 1, 1, None]
    assert answer_token_span(offsets, seq_ids, {"text": ["bar"], "answer_start": [4]}) == (4, 4)
    assert answer_token_span(offsets, seq_ids, {"text": ["foo bar"], "answer_start": [0]}) == (3, 4)
    assert answer_token_span(offsets, seq_ids, {"text": ["baz"], "answer_start": [8]}) == (0, 0)
    assert answer_token_span(offsets, seq_ids, {"text": [], "answer_start": []}) == (0, 0)


def test_featurisation_errors(tokenizer):
    df = qa_frame("Paris is the capital.", "What?", "Paris")
    with pytest.raises(ValueError, match=r"doc_stride must be in \[0, max_length/2\).*"
                                         r"doc_stride=128 with max_length=128"):
        encode(get_task("squad"), df, tokenizer, max_length=128, doc_stride=128)
    enc = encode(get_task("mrpc"), pairs_frame(2), tokenizer)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        make_loader(enc, batch_size=0)
