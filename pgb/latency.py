"""Speed-up budgets: the smallest sparsity whose model runs at least X times faster than the
teacher, measured on the machine that compresses.

``--speedup 2`` asks for a model twice as fast as the teacher at one batch shape
(``--speedup-batch-size`` x ``--speedup-seq-len``, by default 32 x 128 as ``pgb bench``),
on the teacher's device with torch's current thread count. A bisection over the sparsity
builds, at each probe, the physically smaller model of that sparsity (the teacher's
weights: latency does not depend on their values, so nothing is compensated or trained)
and times it interleaved with the teacher: the median, over a few passes, of the teacher's
time over the model's in the same pass (adjacent timings, so a machine whose speed drifts
over minutes cancels out). FLOPs do not predict it: gathers, attention, GELU and LayerNorm
keep their cost under grouping. The bisection keeps whichever probes happened to measure
fast (on a 2-core cloud machine, planned figures ran up to 15% above ``pgb bench``'s), so
its answer is measured again, three times as long, and the sparsity raised a little until
that measurement meets the target.

The timing runs in a fresh Python process (:func:`timer`), as ``pgb bench`` and a serving
process do: the compressing process has run backward passes, after which glibc's malloc
keeps large freed blocks instead of handing them back to the kernel, and every later
forward pass skips the page faults a fresh process pays. The grouped model, whose smaller
matmuls leave those page faults a larger share of its time, then measured faster than
``pgb bench`` finds (PGB at sparsity 0.947 on MRPC: 3.22-3.31x after three backward passes,
2.84-2.98x in a fresh process, ``benchmarks/results/speedup_budget/allocator.md``).

Example::

    >>> sparsity, speedup = sparsity_for_speedup(build_at, teacher, 2.0, 32, 128)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .bench import dummy_batch, time_models
from .flops import OutOfReach, smallest_sparsity

log = logging.getLogger(__name__)

PROBE_REPEATS = 5  # timed passes per model and probe, after one warm-up pass
VERIFY_REPEATS = 15  # timed passes when the answer is measured again
MAX_RAISES = 5  # times the sparsity is raised when the answer measures short
TOLERANCE = 0.01  # the bisection stops within this much sparsity
HIGHEST = 0.97  # the highest sparsity tried


def measured_speedup(model: nn.Module, reference: nn.Module, batch_size: int, seq_len: int,
                     repeats: int = PROBE_REPEATS, warmup: int = 1) -> float:
    """Median over passes of ``reference``'s time / ``model``'s time in the same pass (the
    two are timed in turn, each pass right after the other)."""
    device = next(reference.parameters()).device
    batch = dummy_batch(reference, batch_size, seq_len, device)
    was = model.training, reference.training
    model.eval()
    reference.eval()
    try:
        times = time_models({"reference": reference, "model": model}, batch, repeats, warmup,
                            progress=False)
    finally:
        model.train(was[0])
        reference.train(was[1])
    return statistics.median(r / m for r, m in zip(times["reference"], times["model"],
                                                   strict=True))


def serve() -> None:
    """The timing process: ``python -c "from pgb.latency import serve; serve()" REFERENCE B L
    THREADS``. Answers each JSON line ``{"model": PATH, "repeats": N}`` on stdin with
    ``{"speedup": X}`` (or ``{"error": MESSAGE}``) on stdout, after ``{"ready": true}``."""
    reply = os.fdopen(os.dup(1), "w")  # the replies' own channel ...
    os.dup2(2, 1)  # ... and anything a library prints goes to stderr
    reference, batch_size, seq_len, threads = sys.argv[1:5]
    torch.set_num_threads(int(threads))
    reference = torch.load(reference, weights_only=False).eval()  # our own file
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            model = torch.load(request["model"], weights_only=False)
            answer = {"speedup": measured_speedup(model, reference, int(batch_size),
                                                  int(seq_len), repeats=request["repeats"])}
        except Exception as err:  # reported to the compressing process, which raises it
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), file=reply, flush=True)


class _Worker:
    """The parent's end of :func:`serve`: ``worker(model, reference, b, l, repeats=N)``."""

    def __init__(self, reference: nn.Module, batch_size: int, seq_len: int, folder: Path):
        self.folder, self.shape = folder, (batch_size, seq_len)
        torch.save(reference, folder / "reference.pt")
        self.stderr = open(folder / "stderr.txt", "w+")  # noqa: SIM115 (closed in close())
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from pgb.latency import serve; serve()",
             str(folder / "reference.pt"), str(batch_size), str(seq_len),
             str(torch.get_num_threads())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=env)
        try:
            self._answer()  # {"ready": true}, or the reason it did not start
        except Exception:
            self.close()
            raise

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            tail = self.stderr.read()[-2000:]
            raise RuntimeError(f"the timing process stopped (exit {self.proc.wait()}): {tail}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"timing in a fresh process failed: {answer['error']}")
        return answer

    def __call__(self, model: nn.Module, reference: nn.Module, batch_size: int, seq_len: int,
                 repeats: int = PROBE_REPEATS) -> float:
        if (batch_size, seq_len) != self.shape:
            raise ValueError(f"this timing process measures at {self.shape}, not "
                             f"{(batch_size, seq_len)}")
        torch.save(model, self.folder / "model.pt")
        self.proc.stdin.write(json.dumps({"model": str(self.folder / "model.pt"),
                                          "repeats": repeats}) + "\n")
        self.proc.stdin.flush()
        return self._answer()["speedup"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.stderr.close()


@contextlib.contextmanager
def timer(reference: nn.Module, batch_size: int, seq_len: int
          ) -> Iterator[Callable[..., float]]:
    """A ``measure`` for :func:`sparsity_for_speedup` that times in a fresh Python process
    (see the module docstring); where that process cannot start (a model that cannot be
    pickled, no ``python`` to run), a warning and the timing in this process instead."""
    with tempfile.TemporaryDirectory(prefix="pgb-speedup-") as tmp:
        try:
            worker = _Worker(reference, batch_size, seq_len, Path(tmp))
        except Exception as err:  # noqa: BLE001 (any failure to start: fall back, loudly)
            log.warning("speed-up budget: cannot time in a fresh process (%s); timing in "
                        "this one, whose figures may run high (check with pgb bench)", err)
            yield measured_speedup
            return
        try:
            yield worker
        finally:
            worker.close()


def sparsity_for_speedup(build_at: Callable[[float], nn.Module | None], reference: nn.Module,
                         target: float, batch_size: int, seq_len: int, method: str = "pgb",
                         measure: Callable[..., float] | None = None,
                         tolerance: float = TOLERANCE, highest: float = HIGHEST
                         ) -> tuple[float, float]:
    """(smallest sparsity whose model measured at least ``target`` x, that speed-up).

    ``build_at(s)`` returns the model at sparsity ``s`` (None where no plan can be made);
    ``measure(model, reference, batch_size, seq_len, repeats=N)`` its speed-up (default: a
    fresh process's, from ``timer``, looked up at call time). The bisection's answer is
    measured again with ``VERIFY_REPEATS`` passes, and raised by ``2 * tolerance`` at a
    time (at most ``MAX_RAISES`` times) while that falls short; the speed-up returned is that
    last measurement (below the target, with a warning, if the raises ran out). ValueError when
    even ``highest`` falls short, naming the speed-up measured there.
    """
    if not target > 1.0:
        raise ValueError(f"speedup must be > 1, got {target}; e.g. --speedup 2 asks for a "
                         "model twice as fast as the teacher")
    if measure is None:
        with timer(reference, batch_size, seq_len) as measure:  # the module attribute
            return sparsity_for_speedup(build_at, reference, target, batch_size, seq_len,
                                        method, measure, tolerance, highest)
    measured: dict[float, float] = {}

    def cost_at(sparsity: float) -> float:
        model = build_at(sparsity)
        if model is None:
            return math.inf
        measured[sparsity] = measure(model, reference, batch_size, seq_len,
                                     repeats=PROBE_REPEATS)
        log.info("speed-up probe: sparsity %.3f runs %.2fx (target %gx)", sparsity,
                 measured[sparsity], target)
        return 1.0 / measured[sparsity]

    try:
        sparsity = smallest_sparsity(cost_at, 1.0 / target, tolerance, highest, try_zero=False)
    except OutOfReach as err:
        best = 0.0 if math.isinf(err.least) else 1.0 / err.least
        hint = (" or --method structured (removing heads and neurons also shrinks attention "
                "and GELU, which grouping leaves at their dense cost)") if method == "pgb" else ""
        raise ValueError(
            f"speed-up {target}x is out of reach for method {method} at batch {batch_size} x "
            f"{seq_len} on this machine: even sparsity {highest} measured {best:.2f}x; ask "
            f"for less{hint}") from None
    speedup, raises = 0.0, 0
    while True:
        model = build_at(sparsity)
        if model is not None:
            speedup = measure(model, reference, batch_size, seq_len, repeats=VERIFY_REPEATS)
            log.info("speed-up %gx: sparsity %.4f measured again: %.2fx", target, sparsity,
                     speedup)
            if speedup >= target:
                break
        if raises == MAX_RAISES or sparsity >= highest:
            log.warning("speed-up %gx: sparsity %.4f measured %.2fx, short of the target on "
                        "a noisy machine; check the saved model with pgb bench", target,
                        sparsity, speedup)
            break
        sparsity, raises = min(highest, sparsity + 2 * tolerance), raises + 1
    return sparsity, speedup
