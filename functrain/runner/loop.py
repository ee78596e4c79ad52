"""The one training loop: ``run(step, state, data, steps=N, hooks=[...])``.

``step(state, batch) -> (state, metrics)`` is any pure function over any pytree of states: a
:class:`~functrain.TrainState`, ``{"gen": TrainState, "disc": TrainState}``, a subclass carrying
a teacher. The loop below is all there is; logging, evaluation, checkpoints and resume, stopping
and profiling are hooks (:mod:`functrain.runner.hooks`), objects with a few optional methods the
loop calls at fixed points:

    restore(run)         before anything runs (the checkpoint hook resumes here)
    on_start(run)
    on_epoch_start(run)  before a pass over the data is read (``run.epoch`` counts the passes)
    before_step(run)     ``run.batch`` is the batch the step is about to get
    on_step(run)         after a step, when ``run.step % hook.every == 0``
    on_epoch_end(run)    after a pass, or after the last step (not after a signal: the epoch is
                         not over, the run is interrupted)
    on_log(run, logs)    whenever a hook calls ``run.log(logs)`` (writers: JSONL, TensorBoard, tqdm)
    on_end(run)          after the last step, also after SIGTERM/SIGINT (not after an exception)

A hook ends the run with ``run.stop(reason)`` and the current pass over the data with
``run.end_epoch()``. The loop never reads a tensor on the host: hooks do, on their steps only.
The Hugging Face ``Trainer`` (:mod:`functrain.trainer`) is this loop with HF's callbacks,
logging and checkpoint folders as hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import signal
import threading
from typing import Any, Callable

from functrain.core import tree
from functrain.data import stream
from functrain.parallel import distributed as fd


@dataclasses.dataclass
class Run:
    """What the loop knows; every hook gets it.

    ``state`` and ``metrics`` are the latest step's outputs (tensors: reading one syncs the
    device, so hooks read them on their own steps only), ``batch`` the latest step's input.
    ``step`` counts the steps done, ``epoch`` the passes over the data begun before this one, on
    the host. ``data_position`` is where the data continues on resume (``data.state_dict()``).
    ``signal`` names the signal (``"SIGTERM"``) that stopped the run, if one did.
    """

    state: Any
    steps: int
    data: Any = None
    hooks: list = dataclasses.field(default_factory=list)
    step: int = 0
    metrics: Any = None
    data_position: dict | None = None
    eval_metrics: dict = dataclasses.field(default_factory=dict)
    stop_reason: str | None = None
    signal: str | None = None
    epoch: int = 0
    batch: Any = None
    epoch_ended: bool = False

    def stop(self, reason: str) -> None:
        """Finish after the current step (the ``on_end`` hooks still run, and checkpoint)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def end_epoch(self) -> None:
        """Leave the current pass over the data after this step; the next pass is ``iter(data)``
        again (a list or DataLoader starts over; a loader with a position, like
        :class:`functrain.data.ResumableLoader`, continues where it stands)."""
        self.epoch_ended = True

    @property
    def finished(self) -> bool:
        return self.step >= self.steps or self.stop_reason is not None

    def log(self, logs: dict) -> None:
        """Send host numbers (``{"loss": 0.3}``) at the current step to every hook's ``on_log``."""
        for hook in self.hooks:
            hook.on_log(self, logs)

    @property
    def is_main_process(self) -> bool:
        """Rank 0 (or one process): the process that writes files and prints."""
        return fd.is_main_process()


def run(step: Callable, state, data, *, steps: int, hooks=()) -> Run:
    """Call ``state, metrics = step(state, batch)`` for each batch until ``run.step == steps``.

    Args:
        step: a pure ``step(state, batch) -> (state, metrics)`` (compiled or not, donating or not).
        state: the initial pytree of states (a fresh one: on resume it is the template the
            checkpoint is read into).
        data: where batches come from (see :func:`passes`): a loader with ``state_dict`` /
            ``load_state_dict`` (:class:`functrain.data.ResumableLoader`, torchdata's
            ``StatefulDataLoader``), a function ``data(i) -> batch`` of the step index, or any
            iterable (restarted at its end, one epoch after another).
        steps: the step count to reach (counting from 0, so a resumed run does the rest).
        hooks: :class:`functrain.runner.Hook` objects, called in order (by ``hook.order``, then as
            listed).

    Returns the :class:`Run`: ``.state`` is the final state, ``.stop_reason`` says why it ended
    early (``"SIGTERM"``, a stop hook's reason, ``"data exhausted"``) or is ``None``.

    Each pass over ``data`` is an epoch: ``on_epoch_start``, the steps, ``on_epoch_end``, then
    ``iter(data)`` again, until ``steps`` or a stop.
    """
    _check_arguments(step, steps, hooks)
    # Stable sort by ``order``: the checkpoint hook (order 100) runs after the others on a step,
    # so the state of every hook at that step is in the checkpoint.
    r = Run(state=state, steps=steps, data=data, hooks=sorted(hooks, key=lambda h: h.order))
    for hook in r.hooks:
        hook.restore(r)  # the checkpoint hook: state, step, data position, generators, hook states
    _call(r.hooks, "on_start", r)
    agreement = fd.StopAgreement()  # a signal to one process stops all of them at the same step
    empty_passes = 0
    with _signals_received() as received:
        for epoch_batches in passes(data, r):
            if r.finished or empty_passes == 2:  # two empty passes in a row: the data has ended
                break
            r.epoch_ended = False
            _call(r.hooks, "on_epoch_start", r)
            empty_passes += 1
            for r.batch in epoch_batches:
                empty_passes = 0
                _call(r.hooks, "before_step", r)
                r.state, r.metrics = step(r.state, r.batch)
                r.step += 1
                for hook in r.hooks:
                    if r.step % hook.every == 0:
                        hook.on_step(r)
                if agreement.update(bool(received)):
                    r.signal = received[0] if received else "a signal to another process"
                    r.stop(r.signal)
                if r.finished or r.epoch_ended:
                    break
            if r.signal is not None:
                break
            _call(r.hooks, "on_epoch_end", r)
            r.epoch += 1
        if not r.finished:  # the passes ended (a one-shot iterator) or two in a row were empty
            r.stop("data exhausted")
    agreement.close()
    _call(r.hooks, "on_end", r)
    return r


def _call(hooks, event: str, r: Run) -> None:
    for hook in hooks:
        getattr(hook, event)(r)


def passes(data, r: Run):
    """Passes over the data (epochs), each an iterator of batches, from where the run stands:

    - a loader with ``load_state_dict``: restored to ``r.data_position`` (the position saved in
      the checkpoint), so it continues at the next batch without reading the earlier ones; each
      pass is ``iter(data)``;
    - a callable ``data(i)``: one endless pass, called with the step index (resume is the step);
    - another iterable: each pass is ``iter(data)``, the ``r.step`` batches already consumed
      skipped on resume (read again: O(position)); a one-shot iterator is one pass.

    Two empty passes in a row end the run (one is the tail of an epoch a checkpoint ended at).
    """
    if callable(data) and not hasattr(data, "__iter__"):
        yield (data(i) for i in itertools.count(r.step))
        return
    stateful = hasattr(data, "state_dict") and hasattr(data, "load_state_dict")
    if stateful and r.data_position is not None:
        data.load_state_dict(r.data_position)
    skip = [0 if stateful else r.step]
    if iter(data) is data:  # a one-shot iterator: one pass
        yield _skipping(data, skip)
        return
    while True:
        yield _skipping(iter(data), skip)


def _skipping(batches, skip: list):
    """``batches`` without the first ``skip[0]`` of them (counted down across passes)."""
    for batch in batches:
        if skip[0]:
            skip[0] -= 1
            continue
        yield batch


def data_position(data) -> dict | None:
    """What a checkpoint saves to continue ``data`` exactly (``None``: the step is enough).

    A streaming loader's position holds each rank's own stream: every process calls this at the
    same point, and the ranks' streams are gathered (``streams``, by rank) for the one writer.
    """
    if not (hasattr(data, "state_dict") and hasattr(data, "load_state_dict")):
        return None
    return stream.gathered(data.state_dict(), fd.all_gather_json)


@contextlib.contextmanager
def _signals_received():
    """SIGTERM / SIGINT are recorded (by name) in the yielded list; the loop ends after the
    current step and ``on_end`` checkpoints. A second Ctrl-C stops at once."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _check_arguments(step, steps, hooks) -> None:
    if not callable(step):
        raise TypeError(f"step must be a function step(state, batch) -> (state, metrics), got {type(step).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0 (the step count to reach), got {steps!r}")
    from functrain.runner.hooks import Hook

    for i, h in enumerate(hooks):
        if not isinstance(h, Hook):
            raise TypeError(f"hooks[{i}] is a {type(h).__name__}, not a functrain.runner.Hook; wrap a function "
                            "fn(run) as functrain.runner.every(n, fn)")


def scalars(metrics) -> dict:
    """``{dotted name: 0-d tensor}`` of a metrics pytree (nested dicts give ``"disc.loss"``)."""
    return {k: v for k, v in tree.named_leaves(metrics).items() if hasattr(v, "ndim") and v.ndim == 0}
