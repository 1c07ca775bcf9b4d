"""Compensation: exact when nothing is pruned, reduces reconstruction error, bias-only drops."""

import copy

import pytest
import torch
from test_surgery import make_recipe
from tiny import FAMILIES, tiny_batch, tiny_model

from pgb import compensate as comp
from pgb.arch import get_arch, get_matrix, layer_module
from pgb.compensate import apply_masks, compensate


def calib(n=4):
    return [tiny_batch(n=6, length=13, seed=s) for s in range(n)]


def hidden(model, batches):
    """Last hidden states of every valid token of the calibration batches."""
    outs = []
    with torch.no_grad():
        for b in batches:
            h = model.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            outs.append(h.last_hidden_state[b["attention_mask"].bool()])
    return torch.cat(outs)


def test_nothing_pruned_gives_back_the_teacher():
    teacher = tiny_model("bert").double()
    recipe = make_recipe(teacher, 0.0)
    student = copy.deepcopy(teacher)
    apply_masks(student, recipe)
    for layer in range(2):  # perturb the matrices: compensation must undo it
        for role in ("query", "value", "ffn_in", "ffn_out"):
            get_matrix(student, layer, role).weight.data.add_(0.05)
    compensate(student, teacher, recipe, calib(6), damping=1e-10, progress=False)
    # LayerNorm outputs satisfy one linear relation, so weights are fixed only up to it;
    # the function is exact, on the calibration data and on new inputs alike
    fresh = [tiny_batch(n=5, length=9, seed=99)]
    assert torch.allclose(hidden(student, fresh), hidden(teacher, fresh), atol=1e-6)
    assert torch.allclose(get_matrix(student, 1, "ffn_out").bias,
                          get_matrix(teacher, 1, "ffn_out").bias, atol=1e-6)


def test_compensation_reduces_reconstruction_error():
    teacher = tiny_model("bert")
    recipe = make_recipe(teacher, 0.6)
    masked = copy.deepcopy(teacher)
    apply_masks(masked, recipe)
    fixed = copy.deepcopy(masked)
    batches = calib()
    compensate(fixed, teacher, recipe, batches, progress=False)
    target = hidden(teacher, batches)
    before = (hidden(masked, batches) - target).pow(2).mean()
    after = (hidden(fixed, batches) - target).pow(2).mean()
    assert after < 0.7 * before
    for p in recipe.sublayers:  # structure kept: no weight outside kept blocks
        for role in p.matrices:
            w = get_matrix(fixed, p.layer, role).weight
            assert torch.all(w[p.mask(role) == 0] == 0)


def ffn_inputs(model, batches):
    """The FFN input (ffn_in's input) of layer 1, per batch."""
    seen = []
    hook = get_matrix(model, 1, "ffn_in").register_forward_pre_hook(
        lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    hook.remove()
    return seen


def test_dropped_ffn_bias_closes_the_gap_to_the_teacher_stream():
    teacher = tiny_model("bert")
    recipe = make_recipe(teacher, 0.4, weak=("1.ffn",))  # a target the drop meets
    assert "1.ffn" in recipe.dropped_sublayers()
    student = copy.deepcopy(teacher)
    apply_masks(student, recipe)
    batches = calib()
    compensate(student, teacher, recipe, batches, progress=False)
    # the bias is the mean of (teacher FFN branch + teacher FFN input - student FFN input),
    # so the student's pre-LayerNorm sum matches the teacher's on average
    layer = teacher.bert.encoder.layer[1]
    gaps = []
    with torch.no_grad():
        for xt, xs, b in zip(ffn_inputs(teacher, batches), ffn_inputs(student, batches),
                             batches, strict=True):
            gap = layer.output.dense(layer.intermediate(xt)) + xt - xs
            gaps.append(gap[b["attention_mask"].bool()])
    assert torch.allclose(get_matrix(student, 1, "ffn_out").bias, torch.cat(gaps).mean(0),
                          atol=1e-4)


def test_stream_targets_beat_local_targets_on_the_output():
    teacher = tiny_model("bert")
    recipe = make_recipe(teacher, 0.7)
    batches = calib()
    errors = {}
    for target in ("stream", "local"):
        student = copy.deepcopy(teacher)
        apply_masks(student, recipe)
        compensate(student, teacher, recipe, batches, progress=False, target=target)
        errors[target] = (hidden(student, batches) - hidden(teacher, batches)).pow(2).mean()
    assert errors["stream"] < errors["local"]


@pytest.mark.parametrize("whole", [True, False])
def test_affine_statistics_equal_the_direct_ones(whole):
    # Q, K, V and FFN-in targets are [t_in, 1] @ a.T: their statistics come from sums over
    # the batches (t_in^T x, token sums, x_K^T x_K per distinct K, or x^T x once where that
    # is cheaper), filled in once at the end; neither path forms the ones column or the
    # targets
    from pgb.compensate import _accumulate, _AffineSums

    gen = torch.Generator().manual_seed(0)
    n, d_in, d_out = 57, 9, 13
    x = torch.randn(n, d_in, generator=gen).double()
    t_in = torch.randn(n, d_in, generator=gen).double()
    a = torch.randn(d_out, d_in + 1, generator=gen).double()
    ones = torch.ones(n, 1, dtype=torch.float64)
    x1, t1 = torch.cat([x, ones], 1), torch.cat([t_in, ones], 1)

    def empty(blocks):  # column 9 is the ones column
        blocks = [{"rows": torch.tensor(r), "cols": torch.tensor(c),
                   "c": torch.zeros(len(c), len(c), dtype=torch.float64),
                   "cross": torch.zeros(len(r), len(c), dtype=torch.float64)}
                  for r, c in blocks]
        return {"blocks": blocks, "tsum": torch.zeros(d_out, dtype=torch.float64),
                "n": torch.zeros((), dtype=torch.float64)}

    layouts = [(([0, 5, 7], [2, 4, 9]), ([1, 12], [0, 1, 3, 9])),  # two roles share K's
               (([0, 5, 7], [2, 4, 9]), ([1, 12], [0, 1, 3, 9])),
               (([3, 4], list(range(10))),)]  # all inputs: x^T x is the cheaper way
    layouts = layouts if whole else layouts[:2]  # two small K's: one product per K
    direct = [empty(lay) for lay in layouts]
    shared = [empty(lay) for lay in layouts]
    sums = _AffineSums(shared)
    assert len(sums.grams) == (3 if whole else 2)  # distinct K's
    for _ in range(2):  # two batches
        for st in direct:
            _accumulate(st, x, t1 @ a.T)
        sums.add(x, t_in)
    assert (sums.whole is not None) == whole
    assert all((g is None) == whole for _, g in sums.grams.values())
    for st in shared:
        sums.fill(st, a)
    for s_st, d_st in zip(shared, direct, strict=True):
        torch.testing.assert_close(s_st["tsum"], d_st["tsum"])
        assert s_st["n"] == d_st["n"] == 2 * n
        for s, d in zip(s_st["blocks"], d_st["blocks"], strict=True):
            k = s["cols"]  # both hold 2 x the block's [x_K, 1]^T [x_K, 1]
            torch.testing.assert_close(d["c"], 2 * x1[:, k].T @ x1[:, k])
            torch.testing.assert_close(d["cross"], 2 * (t1 @ a.T)[:, s["rows"]].T @ x1[:, k])
            torch.testing.assert_close(s["c"], d["c"])
            torch.testing.assert_close(s["cross"], d["cross"])


@pytest.mark.parametrize("d", [7, 300, 777])
def test_gram_from_strips_is_the_symmetric_product(d):
    from pgb.compensate import _add_gram

    x = torch.randn(131, d, generator=torch.Generator().manual_seed(d))
    acc = torch.eye(d, dtype=torch.float64)  # added to, into a float64 accumulator
    _add_gram(acc, x)
    expected = torch.eye(d, dtype=torch.float64) + x.double().T @ x.double()
    torch.testing.assert_close(acc, expected, rtol=1e-5, atol=1e-3)


def test_teacher_prior_interpolates_between_least_squares_and_no_compensation():
    teacher = tiny_model("bert").double()
    recipe = make_recipe(teacher, 0.6)
    masked = copy.deepcopy(teacher)
    apply_masks(masked, recipe)
    batches = calib()

    def refit(damping, prior):
        student = copy.deepcopy(masked)
        compensate(student, teacher, recipe, batches, damping=damping, progress=False,
                   prior=prior)
        return student

    def kept_weights(model):
        return torch.cat([get_matrix(model, p.layer, r).weight[p.mask(r) > 0]
                          for p in recipe.sublayers for r in p.matrices])

    # damping -> infinity: the teacher prior keeps the masked teacher's weights (no
    # compensation), the zero prior shrinks them towards 0
    stiff = kept_weights(refit(1e9, "teacher"))
    assert torch.allclose(stiff, kept_weights(masked), atol=1e-6)
    assert kept_weights(refit(1e9, "zero")).abs().max() < 1e-6
    # damping -> 0: both priors fit the calibration data equally well; the weights differ
    # only where the inputs are degenerate (LayerNorm outputs satisfy a linear relation),
    # where the teacher prior keeps the teacher's component and the zero prior drops it
    loose_t, loose_z = refit(1e-9, "teacher"), refit(1e-9, "zero")
    assert torch.allclose(hidden(loose_t, batches), hidden(loose_z, batches), atol=1e-5)
    assert (kept_weights(loose_t) - kept_weights(loose_z)).abs().max() > 1e-3
    # in between: a real compensation that differs from both ends
    mid = kept_weights(refit(1.0, "teacher"))
    assert (mid - stiff).abs().max() > 1e-3
    assert (mid - kept_weights(refit(1.0, "zero"))).abs().max() > 1e-3


def test_unknown_compensation_prior_is_refused():
    teacher = tiny_model("bert")
    recipe = make_recipe(teacher, 0.6)
    with pytest.raises(ValueError, match="prior"):
        compensate(copy.deepcopy(teacher), teacher, recipe, calib(1), progress=False,
                   prior="ones")


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_outputs_give_the_same_weights(family, monkeypatch):
    """Replaying refitted matrices' outputs changes no bit of the result, whether every
    output fits the budget, only Q/K/V fit, or none (every pass runs every matrix)."""
    teacher = tiny_model(family)
    recipe = make_recipe(teacher, 0.6, weak=("1.attn",))
    batches = calib(3)
    tokens = sum(b["input_ids"].numel() for b in batches)
    hidden = teacher.config.hidden_size
    runs: dict = {}  # student matrix -> calls that ran its weights
    linear_forward = torch.nn.Linear.forward

    def counted(self, x):
        runs[self] = runs.get(self, 0) + 1
        return linear_forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    run_compact = comp.run_compact  # refitted matrices run in compact form

    def counted_compact(linear, grouped, x):
        runs[linear] = runs.get(linear, 0) + 1
        return run_compact(linear, grouped, x)

    monkeypatch.setattr(comp, "run_compact", counted_compact)
    # the attention core and the FFN activation: calls that entered their own forward
    spec, layer0 = get_arch(teacher), layer_module(teacher, 0)
    for path in (spec.attn_core, spec.ffn_act):
        cls = type(layer0.get_submodule(path))
        monkeypatch.setattr(cls, "forward", _counting(cls.forward, runs))
    # passes entering the core, from the Q/K/V statistics on: 2 (core final after Q/K/V)
    # or 3 (attention-out inside it) before it replays, 5 when it never does
    core_replayed = 3 if spec.attn_out_in_core else 2
    results = []
    for budget, (q_runs, ffn_in_runs, core_runs, act_runs) in (
            (comp.REPLAY_BYTES, (1, 1, core_replayed, 1)),
            (3 * tokens * hidden * 4, (1, 2, 5, 2)), (0, (4, 2, 5, 2))):
        monkeypatch.setattr(comp, "REPLAY_BYTES", budget)
        student = copy.deepcopy(teacher)
        apply_masks(student, recipe)
        runs.clear()
        compensate(student, teacher, recipe, batches, progress=False)
        results.append(student.state_dict())
        # passes after Q's refit: attention-out, FFN-in, FFN-out statistics, layer output
        assert runs[get_matrix(student, 0, "query")] == q_runs * len(batches)
        assert runs[get_matrix(student, 0, "ffn_in")] == ffn_in_runs * len(batches)
        s_layer0 = layer_module(student, 0)
        assert runs[s_layer0.get_submodule(spec.attn_core)] == core_runs * len(batches)
        assert runs[s_layer0.get_submodule(spec.ffn_act)] == act_runs * len(batches)
    for other in results[1:]:
        for name, w in results[0].items():
            assert torch.equal(w, other[name]), name


def _counting(forward, runs: dict):
    def counted(self, *args, **kwargs):
        runs[self] = runs.get(self, 0) + 1
        return forward(self, *args, **kwargs)
    return counted


def test_replay_returns_recorded_outputs_and_drops_those_changed_in_place():
    model = tiny_model("bert")
    value = get_matrix(model, 0, "value")
    xs = [torch.randn(2, 5, model.config.hidden_size) for _ in range(3)]
    replay = comp._Replay(model, 0, [{"args": (x,), "kwargs": {}} for x in xs])
    replay.refitted(["value", "ffn_in"])
    ffn_in = get_matrix(model, 0, "ffn_in")
    # value and ffn_in, and what they make final: BERT's attention core (its width is
    # value's) and the FFN activation (ffn_in's)
    assert replay.pending == ["value", "ffn_in", "attn_core", "ffn_act"]
    assert replay.bytes == 3 * 2 * 5 * 2 * (value.out_features + ffn_in.out_features) * 4
    with replay:  # the pass after the refit records; ffn_in does not run in it
        recorded = [value(x) for x in xs]
    assert list(replay.outputs) == ["value"]
    with torch.no_grad():
        value.weight.zero_()  # not run any more: the recorded tensors come back
    with replay:
        assert all(value(x) is r for x, r in zip(xs, recorded, strict=True))
    assert "forward" not in vars(value)  # the module's own forward is back outside passes
    assert value(xs[0]).abs().max() < value.bias.abs().max() + 1e-6
    with replay:  # model code changing a replayed output in place: no longer replayed
        for x in xs:
            value(x).mul_(2)
    assert not replay.outputs
    with replay:
        assert torch.equal(value(xs[0]), value.bias.expand(2, 5, -1))


def ragged(n_batches=3, rows=6, length=14, seed=0):
    """Right-padded batches of random lengths, with labels (Fisher passes need them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lengths = torch.randint(3, length + 1, (rows,), generator=g)
        lengths[0] = length
        mask = (torch.arange(length) < lengths[:, None]).long()
        ids = torch.randint(5, 60, (rows, length), generator=g) * mask + (1 - mask)
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.randint(0, 3, (rows,), generator=g)})
    return out


def by_length(batches, size):
    """The same examples sorted by length and re-batched, each batch cut to its longest."""
    rows = [(int(m.sum()), ids, m, y) for b in batches
            for ids, m, y in zip(b["input_ids"], b["attention_mask"], b["labels"], strict=True)]
    rows.sort(key=lambda r: r[0])
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        width = max(r[0] for r in chunk)
        out.append({"input_ids": torch.stack([r[1][:width] for r in chunk]),
                    "attention_mask": torch.stack([r[2][:width] for r in chunk]),
                    "labels": torch.stack([r[3] for r in chunk])})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_of_the_fisher_pass_replaces_the_teacher_pass(family, monkeypatch):
    """Compensation from the teacher's activations recorded in the Fisher pass (other
    batches, cut into pieces) gives the weights of running the teacher itself, without
    running it; a trace that misses examples makes compensation run the teacher."""
    from pgb import pieces as pieces_mod
    from pgb.importance import importance_scores
    from pgb.trace import TeacherTrace

    monkeypatch.setattr(pieces_mod, "PASS_TOKENS", 0)  # Fisher batches run as pieces
    teacher = tiny_model(family).double()
    recipe = make_recipe(teacher, 0.6, weak=("1.attn",))
    fisher_batches = ragged()
    trace = TeacherTrace(teacher)
    importance_scores(teacher, fisher_batches, "fisher", progress=False, trace=trace)
    partial = TeacherTrace(teacher)
    importance_scores(teacher, fisher_batches[:2], "fisher", progress=False, trace=partial)
    comp_batches = by_length(fisher_batches, 5)
    calls = []
    t_ffn_out = get_matrix(teacher, 1, "ffn_out")  # (the students' copies carry the hook)
    hook = t_ffn_out.register_forward_hook(lambda m, *_: calls.append(m is t_ffn_out))
    weights = {}
    for name, tr in (("plain", None), ("traced", trace), ("partial", partial)):
        student = copy.deepcopy(teacher)
        apply_masks(student, recipe)
        calls.clear()
        compensate(student, teacher, recipe, comp_batches, progress=False, trace=tr)
        weights[name] = (student.state_dict(), sum(calls))
    hook.remove()
    (plain, plain_calls), (traced, traced_calls), (part, part_calls) = weights.values()
    assert plain_calls == part_calls == len(comp_batches) and traced_calls == 0
    for name, w in plain.items():
        torch.testing.assert_close(traced[name], w, rtol=1e-9, atol=1e-11)
        assert torch.equal(part[name], w), name


def test_trace_skips_left_padding_and_samples_over_its_budget(monkeypatch):
    from pgb import trace as trace_mod
    from pgb.importance import importance_scores

    left = {"input_ids": torch.tensor([[1, 7, 8], [6, 7, 8]]),
            "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
    assert trace_mod.example_keys(left) is None
    right = {"input_ids": torch.tensor([[7, 8, 1], [7, 8, 9]]),
             "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
             "token_type_ids": torch.tensor([[0, 1, 0], [0, 1, 1]])}
    keys = trace_mod.example_keys(right)
    assert len(set(keys)) == 2 and keys[0] == trace_mod.example_keys(
        {k: v[:1, :2] for k, v in right.items()})[0]  # padding is not part of the key
    teacher = tiny_model("bert")
    tr = trace_mod.TeacherTrace(teacher)
    importance_scores(teacher, ragged(1), "fisher", progress=False, trace=tr)
    assert all(len(layer) == 6 for layer in tr.store)  # six distinct examples
    for name, value in (("TRACE_BYTES", 0), ("available_bytes", lambda _device: 1000)):
        with monkeypatch.context() as m:  # over the fixed budget, or the free memory's share
            m.setattr(trace_mod, name, value)
            tr = trace_mod.TeacherTrace(teacher)
            importance_scores(teacher, ragged(1), "fisher", progress=False, trace=tr)
            assert not any(tr.store)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_refitted_matrices_run_compact_and_give_the_dense_result(family, monkeypatch):
    """After its refit a matrix runs as a GroupedLinear of its kept blocks, never as the
    masked dense matrix; the weights equal those of a run through the dense matrices up to
    float rounding (which the least squares carry on: about 3e-5 of the largest weight)."""
    teacher = tiny_model(family)
    recipe = make_recipe(teacher, 0.6, weak=("1.attn",))
    batches = calib(3)
    dense_runs = []
    linear_forward = torch.nn.Linear.forward

    def counted(self, x):
        dense_runs.append(self)
        return linear_forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    results = []
    for compact in (True, False):
        if not compact:
            monkeypatch.setattr(comp, "_compact", lambda *_args: None)
        student = copy.deepcopy(teacher)
        apply_masks(student, recipe)
        dense_runs.clear()
        compensate(student, teacher, recipe, batches, progress=False)
        results.append(student.state_dict())
        matrices = {get_matrix(student, layer, role)
                    for layer in range(teacher.config.num_hidden_layers)
                    for role in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")}
        ran = matrices & set(dense_runs)
        assert (not ran) if compact else ran
    for name, w in results[0].items():  # least squares carry the rounding: relative 1e-4
        other = results[1][name]
        assert (w - other).abs().max() <= 1e-4 * other.abs().max(), name
