"""The one training loop: ``run(step, state, data, steps=N, hooks=[...])``.

``step(state, batch) -> (state, metrics)`` is any pure function over any pytree of states: a
:class:`~functrain.TrainState`, ``{"gen": TrainState, "disc": TrainState}``, a subclass carrying
a teacher. The loop below is all there is; logging, evaluation, checkpoints and resume, stopping
and profiling are hooks (:mod:`functrain.runner.hooks`), objects with a few optional methods the
loop calls at fixed points:

    restore(run)       before anything runs (the checkpoint hook resumes here)
    on_start(run)
    on_step(run)       after a step, when ``run.step % hook.every == 0``
    on_log(run, logs)  whenever a hook calls ``run.log(logs)`` (writers: JSONL, TensorBoard, tqdm)
    on_end(run)        after the last step, also after SIGTERM/SIGINT (not after an exception)

The loop never reads a tensor on the host: hooks do, on their steps only.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    device, so hooks read them on their own steps only). ``step`` counts the steps done, on the
    host. ``data_position`` is where the data continues on resume (``data.state_dict()``).
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

    def stop(self, reason: str) -> None:
        """Finish after the current step (the ``on_end`` hooks still run, and checkpoint)."""
        if self.stop_reason is None:
            self.stop_reason = reason

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
        data: where batches come from (see :func:`batches`): a loader with ``state_dict`` /
            ``load_state_dict`` (:class:`functrain.data.ResumableLoader`, torchdata's
            ``StatefulDataLoader``), a function ``data(i) -> batch`` of the step index, or any
            iterable (restarted at its end, one epoch after another).
        steps: the step count to reach (counting from 0, so a resumed run does the rest).
        hooks: :class:`functrain.runner.Hook` objects, called in order (by ``hook.order``, then as
            listed).

    Returns the :class:`Run`: ``.state`` is the final state, ``.stop_reason`` says why it ended
    early (``"SIGTERM"``, a stop hook's reason, ``"data exhausted"``) or is ``None``.
    """
    _check_arguments(step, steps, hooks)
    # Stable sort by ``order``: the checkpoint hook (order 100) runs after the others on a step,
    # so the state of every hook at that step is in the checkpoint.
    r = Run(state=state, steps=steps, data=data, hooks=sorted(hooks, key=lambda h: h.order))
    for hook in r.hooks:
        hook.restore(r)  # the checkpoint hook: state, step, data position, generators, hook states
    for hook in r.hooks:
        hook.on_start(r)
    stream = batches(data, r)
    agreement = fd.StopAgreement()  # a signal to one process stops all of them at the same step
    with _signals_received() as received:
        while r.step < steps and r.stop_reason is None:
            batch = next(stream, _END)
            if batch is _END:
                r.stop("data exhausted")
                break
            r.state, r.metrics = step(r.state, batch)
            r.step += 1
            for hook in r.hooks:
                if r.step % hook.every == 0:
                    hook.on_step(r)
            if agreement.update(bool(received)):
                r.stop(received[0] if received else "a signal to another process")
    agreement.close()
    for hook in r.hooks:
        hook.on_end(r)
    return r


_END = object()


def batches(data, r: Run):
    """Batches from where the run stands, forever (epoch after epoch) unless the data ends.

    - a loader with ``load_state_dict``: restored to ``r.data_position`` (the position saved in
      the checkpoint), so it continues at the next batch without reading the earlier ones;
    - a callable ``data(i)``: called with the step index (resume is the step itself);
    - another iterable: read from its start, the ``r.step`` batches already consumed skipped
      (read again: O(position)); an iterator that is not re-iterable ends the run when it ends.
    """
    if callable(data) and not hasattr(data, "__iter__"):
        i = r.step
        while True:
            yield data(i)
            i += 1
    stateful = hasattr(data, "state_dict") and hasattr(data, "load_state_dict")
    if stateful and r.data_position is not None:
        data.load_state_dict(r.data_position)
    skip = 0 if stateful else r.step
    empty_passes = 0
    while empty_passes < 2:  # one empty pass is the tail of an epoch a checkpoint ended at
        empty_passes += 1
        for batch in data:
            empty_passes = 0
            if skip:
                skip -= 1
                continue
            yield batch
        if iter(data) is data:  # a one-shot iterator: it is over
            return


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
