"""Speed-up budgets: the bisection over measured speed-ups has known answers, timings are
taken interleaved and leave the models as they were, and bad budgets are refused."""

import logging
import os
import time
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from pgb.config import CompressConfig
from pgb.latency import (
    PROBE_REPEATS,
    VERIFY_REPEATS,
    measured_speedup,
    sparsity_for_speedup,
    timer,
)


def _linear(s):  # a model of sparsity s runs 1 + 2 s times as fast as the teacher
    return 1.0 + 2.0 * s


def _build(s):
    return SimpleNamespace(sparsity=s)


def _measure(model, reference, batch_size, seq_len, repeats):
    return _linear(model.sparsity)


def test_sparsity_for_speedup_known_answers():
    s, x = sparsity_for_speedup(_build, None, 2.0, 32, 128, measure=_measure)
    assert x == _linear(s) >= 2.0 and s == pytest.approx(0.5, abs=0.011)
    # a plan that cannot be made at a sparsity counts as too slow there
    s, x = sparsity_for_speedup(lambda s: None if s < 0.7 else _build(s), None, 1.2, 32, 128,
                                measure=_measure)
    assert s == pytest.approx(0.7, abs=0.011) and x >= 1.2


def test_answer_measured_short_again_is_raised():
    """Short probes that flatter (+0.1x) lead the bisection too low; the longer measurement
    of its answer raises the sparsity 0.02 at a time until the target is met."""
    calls = []

    def flattering(model, reference, batch_size, seq_len, repeats):
        calls.append(repeats)
        return _linear(model.sparsity) + (0.1 if repeats == PROBE_REPEATS else 0.0)

    s, x = sparsity_for_speedup(_build, None, 2.0, 32, 128, measure=flattering)
    assert x >= 2.0 and x == pytest.approx(_linear(s))
    assert s == pytest.approx(0.51, abs=0.011)
    assert calls.count(VERIFY_REPEATS) == 4  # the answer (~0.45) and three raises
    # a machine that never measures the target again: the raises stop, the figure is honest
    s, x = sparsity_for_speedup(_build, None, 2.0, 32, 128, measure=lambda m, r, b, n, repeats:
                                _linear(m.sparsity) + (1.0 if repeats == PROBE_REPEATS
                                                       else -1.0))
    assert x < 2.0 and x == pytest.approx(_linear(s) - 1.0)


def test_sparsity_for_speedup_out_of_reach_names_the_best():
    with pytest.raises(ValueError, match=r"speed-up 4.0x is out of reach for method pgb at "
                                         r"batch 1 x 64 .* even sparsity 0.97 measured 2.94x"
                                         r".*--method structured"):
        sparsity_for_speedup(_build, None, 4.0, 1, 64, measure=_measure)
    with pytest.raises(ValueError, match="out of reach for method structured") as err:
        sparsity_for_speedup(_build, None, 4.0, 1, 64, method="structured", measure=_measure)
    assert "--method structured" not in str(err.value)
    with pytest.raises(ValueError, match="speedup must be > 1, got 1.0"):
        sparsity_for_speedup(_build, None, 1.0, 32, 128, measure=_measure)


class _Sleeper(nn.Module):
    """Takes ``seconds`` per forward; shaped enough for ``dummy_batch``."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vocab_size=50)
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        assert input_ids.shape == (3, 7) and not self.training
        self.calls += 1
        time.sleep(self.seconds)
        return input_ids


def test_measured_speedup_times_both_models_in_turn():
    slow, fast = _Sleeper(0.03), _Sleeper(0.01)
    slow.train()
    fast.eval()
    x = measured_speedup(fast, slow, 3, 7, repeats=3, warmup=1)
    assert 2.0 < x < 3.5  # 30 ms against 10 ms in each pass, plus a little overhead
    assert slow.calls == fast.calls == 4
    assert slow.training and not fast.training  # each back in its own mode


@pytest.mark.parametrize("cfg,message", [
    ({"speedup": 1.0}, r"speedup must be > 1, got 1.0"),
    ({"speedup": 2.0, "flops_ratio": 0.5}, "one budget: --flops-ratio or --speedup"),
    ({"speedup": 2.0, "method": "magnitude"}, "a --speedup budget needs --method pgb or "
                                              "structured"),
    ({"speedup": 2.0, "uniform_groups": True}, "not --speedup"),
    ({"speedup": 2.0, "speedup_seq_len": 0}, "speed-up shape must be positive"),
])
def test_bad_speedup_budget_is_refused(cfg, message):
    with pytest.raises(ValueError, match=message):
        CompressConfig(**cfg)


def _bert(hidden: int, layers: int, vocab: int = 97) -> nn.Module:
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden,
                                     num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=3 * hidden + 1, num_labels=2)
    return transformers.BertForSequenceClassification(config).eval()


def test_timer_measures_in_a_fresh_process():
    """The default measurement runs in another Python process (a fresh malloc heap, as in
    pgb bench), sees the model as built here, and reports what fails there."""
    torch.manual_seed(0)
    big, small = _bert(96, 4), _bert(16, 1)
    with timer(big, 4, 64) as measure:
        assert measure.proc.pid != os.getpid()
        assert measure(small, big, 4, 64, repeats=3) > 1.5  # a tenth of the layer widths
        assert measure(big, big, 4, 64, repeats=3) == pytest.approx(1.0, rel=0.5)
        with pytest.raises(ValueError, match=r"measures at \(4, 64\), not \(1, 64\)"):
            measure(small, big, 1, 64)
        # token ids past a model's vocabulary: the error comes back named
        with pytest.raises(RuntimeError, match="timing in a fresh process failed: IndexError"):
            measure(_bert(16, 1, vocab=3), big, 4, 64, repeats=1)
        assert measure(small, big, 4, 64, repeats=1) > 1.0  # and the process goes on
    assert measure.proc.poll() is not None  # stopped on leaving


class _Unpicklable(nn.Linear):
    def __init__(self):
        super().__init__(2, 2)
        self.hook = lambda: None  # a lambda cannot be pickled


def test_timer_falls_back_to_this_process_loudly(caplog):
    with caplog.at_level(logging.WARNING, "pgb.latency"), timer(_Unpicklable(), 4, 8) as measure:
        assert measure is measured_speedup
    assert "cannot time in a fresh process" in caplog.text


class _Local(nn.Linear):
    """Picklable here, but the timing process cannot import this test module."""


def test_timer_that_cannot_start_falls_back_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, "pgb.latency"), timer(_Local(2, 2), 4, 8) as measure:
        assert measure is measured_speedup
    assert "the timing process stopped (exit 1)" in caplog.text
    assert "No module named 'test_latency'" in caplog.text
