"""Metrics with hand-computed answers, QA post-processing, and evaluate() on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
)

from pgb.data import load_split
from pgb.evaluation import (
    compute_metrics,
    evaluate,
    normalize_answer,
    postprocess_qa,
    squad_metrics,
)
from pgb.features import encode, length_order, make_loader
from pgb.tasks import custom_task, get_task


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def tiny_config(tokenizer, num_labels: int = 2) -> BertConfig:
    return BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=37, num_labels=num_labels)


# ----------------------------------------------------------------------------- GLUE metrics


def test_accuracy_three_of_four():
    assert compute_metrics(get_task("sst2"), [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}


def test_f1_from_confusion_table():
    # TP=2 (rows 0,1), FP=1 (row 2), FN=1 (row 3), TN=1: P = R = 2/3, so F1 = 2/3.
    preds, refs = [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]
    out = compute_metrics(get_task("mrpc"), preds, refs)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["f1"] == pytest.approx(2 / 3)
    assert set(compute_metrics(get_task("qqp"), preds, refs)) == {"accuracy", "f1"}


def test_mcc_tiny_case():
    # TP=1, TN=2, FP=0, FN=1: MCC = (1*2 - 0*1) / sqrt((1+0)(1+1)(2+0)(2+1)) = 2/sqrt(12).
    out = compute_metrics(get_task("cola"), [1, 0, 0, 0], [1, 1, 0, 0])
    assert out["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert out["accuracy"] == pytest.approx(0.75)


def test_pearson_linear_and_anticorrelated():
    refs = np.array([0.0, 1.0, 2.5, 4.0])
    stsb = get_task("stsb")
    assert compute_metrics(stsb, 2 * refs + 1, refs)["pearson"] == pytest.approx(1.0)
    assert compute_metrics(stsb, -refs, refs)["pearson"] == pytest.approx(-1.0)


def test_spearman_with_ties():
    # Ranks of refs [1,2,2,3] are [1,2.5,2.5,4]; of preds [1,2,3,4]. Deviations from 2.5:
    # [-1.5,0,0,1.5] and [-1.5,-.5,.5,1.5]: rho = 4.5 / sqrt(4.5 * 5).
    out = compute_metrics(get_task("stsb"), [1, 2, 3, 4], [1, 2, 2, 3])
    assert out["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
    assert set(out) == {"pearson", "spearman"}


def test_mnli_and_custom_metric_keys():
    assert compute_metrics(get_task("mnli"), [0, 1, 2], [0, 1, 1]) == {"accuracy": 2 / 3}
    # macro F1: class 0 F1 = 1, class 1 P=1 R=1/2 F1=2/3, class 2 P=1/2 R=1 F1=2/3.
    out = compute_metrics(custom_task(["t"], "y", num_labels=3), [0, 1, 2, 2], [0, 1, 1, 2])
    assert out["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_compute_metrics_errors():
    with pytest.raises(ValueError, match=r"shapes \(2,\) and \(3,\)"):
        compute_metrics(get_task("sst2"), [1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="use squad_metrics"):
        compute_metrics(get_task("squad"), ["a"], ["a"])


# ----------------------------------------------------------------------------- SQuAD metrics


def test_squad_normalisation():
    assert normalize_answer("The Cat!") == "cat"
    assert normalize_answer("  an   Apple, a day ") == "apple day"
    assert squad_metrics({"q": "The Cat!"}, {"q": ["cat"]}) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_max_over_gold_answers():
    out = squad_metrics({"q": "blue whale"}, {"q": ["whale", "the blue whale"]})
    assert out == {"exact_match": 100.0, "f1": 100.0}


def test_squad_partial_f1():
    # pred tokens [big, red, dog], gold [red, dog, barked]: 2 common, P = R = 2/3, F1 = 2/3.
    out = squad_metrics({"q": "the big red dog"}, {"q": ["red dog barked"]})
    assert out["exact_match"] == 0.0
    assert out["f1"] == pytest.approx(200 / 3)


def test_squad_missing_prediction_scores_zero():
    out = squad_metrics({"a": "Paris"}, {"a": ["Paris"], "b": ["Rome"]})
    assert out == {"exact_match": 50.0, "f1": 50.0}


def test_squad_v2_no_answer_convention():
    answers = {"u": [], "a": ["Paris"]}
    assert squad_metrics({"u": "", "a": "Paris"}, answers, v2=True) == {"exact_match": 100.0,
                                                                          "f1": 100.0}
    assert squad_metrics({"u": "Mars", "a": ""}, answers, v2=True) == {"exact_match": 0.0,
                                                                         "f1": 0.0}


# ----------------------------------------------------------------------------- QA post-processing


def one_hot_logits(n_tokens: int, index: int) -> np.ndarray:
    logits = np.full(n_tokens, -10.0)
    logits[index] = 10.0
    return logits


def test_postprocess_picks_span_and_v2_null(tokenizer):
    df = pd.DataFrame({"id": ["q"], "title": ["t"], "context": ["Paris is the capital of France."],
                       "question": ["What is the capital?"],
                       "answers": [{"text": ["Paris"], "answer_start": [0]}]})
    enc = encode(get_task("squad"), df, tokenizer, max_length=384, train=False)
    n = len(enc.offsets[0])
    first = enc.offsets[0].index((0, 5))  # "paris"
    last = enc.offsets[0].index((24, 30))  # "france"
    start, end = one_hot_logits(n, first), one_hot_logits(n, last)
    assert postprocess_qa(enc, [start], [end]) == {"q": "Paris is the capital of France"}
    # A span longer than max_answer_length is dropped for the next best valid one.
    assert postprocess_qa(enc, [start], [end], max_answer_length=2)["q"] != (
        "Paris is the capital of France")
    cls_start, cls_end = start.copy(), end.copy()
    cls_start[0] = cls_end[0] = 20.0  # CLS beats the span: "no answer" under v2 only
    assert postprocess_qa(enc, [cls_start], [cls_end], v2=True) == {"q": ""}
    assert postprocess_qa(enc, [cls_start], [cls_end], v2=False)["q"] != ""


def gold_logits(enc, gold) -> tuple[list[np.ndarray], list[np.ndarray], set[str]]:
    """Logits peaked on the gold span's tokens in every window holding it; ids so covered."""
    starts, ends, covered = [], [], set()
    for qid, offs in zip(enc.example_ids, enc.offsets, strict=True):
        s_char = gold[qid]["answer_start"][0]
        e_char = s_char + len(gold[qid]["text"][0])
        s_tok = [i for i, o in enumerate(offs) if o is not None and o[0] == s_char]
        e_tok = [i for i, o in enumerate(offs) if o is not None and o[1] == e_char]
        if s_tok and e_tok:
            covered.add(qid)
        starts.append(one_hot_logits(len(offs), s_tok[0] if s_tok and e_tok else 0))
        ends.append(one_hot_logits(len(offs), e_tok[0] if s_tok and e_tok else 0))
    return starts, ends, covered


def test_qa_round_trip_on_real_dev(tokenizer, shared_data):
    task = get_task("squad")
    df = load_split(task, "validation", data_dir=shared_data).iloc[:12]
    gold = {r.id: r.answers for r in df.itertuples()}
    covered = gold_logits(encode(task, df, tokenizer, max_length=384, train=False), gold)[2]
    # Answers that end inside a word piece ("gold" in "golden") cannot be hit exactly.
    df = df[df["id"].isin(covered)]
    assert len(df) >= 8
    enc = encode(task, df, tokenizer, max_length=384, train=False)
    starts, ends, _ = gold_logits(enc, gold)
    predictions = postprocess_qa(enc, starts, ends)
    assert set(predictions) == set(df["id"])
    assert squad_metrics(predictions, enc.answers) == {"exact_match": 100.0, "f1": 100.0}


# ----------------------------------------------------------------------------- evaluate()


def test_evaluate_matches_manual_loop_and_restores_mode(tokenizer, shared_data):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(tokenizer)).train()
    task = get_task("sst2")
    out = evaluate(model, task, tokenizer, data_dir=shared_data, max_samples=40, batch_size=16,
                   progress=False)
    assert model.training  # mode restored
    assert set(out) == {"accuracy", "samples"} and out["samples"] == 40
    df = load_split(task, "validation", data_dir=shared_data, max_samples=40)
    enc = encode(task, df, tokenizer)
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
                           for b in make_loader(enc, 7)])
    assert out["accuracy"] == pytest.approx(float((preds.numpy() == df["label"]).mean()))


def test_evaluate_mnli_both_splits(tokenizer, tmp_path):
    (tmp_path / "mnli").mkdir()
    for split, n in (("validation_matched", 6), ("validation_mismatched", 4)):
        pd.DataFrame({"premise": ["a cat sat"] * n, "hypothesis": ["an animal sat"] * n,
                      "label": [i % 3 for i in range(n)]}).to_parquet(
            tmp_path / "mnli" / f"{split}.parquet")
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(tokenizer, 3)).eval()
    out = evaluate(model, get_task("mnli"), tokenizer, data_dir=tmp_path, progress=False)
    assert set(out) == {"accuracy", "samples", "accuracy_mm", "samples_mm"}
    assert (out["samples"], out["samples_mm"]) == (6, 4)
    assert not model.training
    # identical inputs give one predicted class: accuracy is that class's share of the labels
    # (matched labels 0,1,2,0,1,2; mismatched 0,1,2,0).
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["accuracy_mm"] in (0.5, 0.25)


def test_evaluate_regression_and_qa(tokenizer, shared_data):
    torch.manual_seed(0)
    reg = BertForSequenceClassification(tiny_config(tokenizer, 1))
    out = evaluate(reg, get_task("stsb"), tokenizer, data_dir=shared_data, max_samples=24,
                   progress=False)
    assert set(out) == {"pearson", "spearman", "samples"}
    assert -1.0 <= out["spearman"] <= 1.0
    qa = BertForQuestionAnswering(tiny_config(tokenizer))
    out = evaluate(qa, get_task("squad"), tokenizer, data_dir=shared_data, max_samples=4,
                   progress=False)
    assert set(out) == {"exact_match", "f1", "samples"} and out["samples"] == 4
    assert 0.0 <= out["exact_match"] <= out["f1"] <= 100.0


def test_length_ordered_batches_give_the_in_order_predictions(tokenizer, shared_data,
                                                              monkeypatch):
    """evaluate() batches by length (little padding) and must put every prediction back on
    its own example: compare with a plain in-order loop, one example per batch."""
    import pgb.evaluation
    torch.manual_seed(1)
    task = get_task("stsb")
    model = BertForSequenceClassification(tiny_config(tokenizer, 1)).eval()
    df = load_split(task, "validation", data_dir=shared_data, max_samples=50)
    enc = encode(task, df, tokenizer)
    assert not np.array_equal(length_order(enc), np.arange(50))  # the order does change
    with torch.no_grad():
        preds = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits[:, 0]
                           for b in make_loader(enc, 1)]).numpy()
    seen = []
    monkeypatch.setattr(pgb.evaluation, "compute_metrics",
                        lambda t, p, labels: seen.append(p) or compute_metrics(t, p, labels))
    evaluate(model, task, tokenizer, data_dir=shared_data, max_samples=50, batch_size=8,
             progress=False)
    np.testing.assert_allclose(seen[0], preds, atol=1e-5)

    qa_task = get_task("squad")
    qa = BertForQuestionAnswering(tiny_config(tokenizer)).eval()
    qdf = load_split(qa_task, "validation", data_dir=shared_data, max_samples=12)
    qenc = encode(qa_task, qdf, tokenizer, max_length=384, train=False, doc_stride=128)
    with torch.no_grad():
        outs = [qa(**b) for b in make_loader(qenc, 1)]
    answers = postprocess_qa(qenc, [o.start_logits[0].numpy() for o in outs],
                             [o.end_logits[0].numpy() for o in outs])
    expected = squad_metrics(answers, qenc.answers)
    out = evaluate(qa, qa_task, tokenizer, data_dir=shared_data, max_samples=12, batch_size=5,
                   progress=False)
    assert (out["exact_match"], out["f1"]) == pytest.approx(
        (expected["exact_match"], expected["f1"]), abs=1e-6)
    assert expected["f1"] > 0  # the comparison can fail: a shuffled answer scores differently
