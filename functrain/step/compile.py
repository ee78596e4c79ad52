"""``compile_step``: ``torch.compile`` a whole pure step, with the settings a step needs."""

from __future__ import annotations

import functools

import torch


def compile_step(fn, backend: str | bool = True, **compile_kwargs):
    """``fn`` compiled whole (``fullgraph=True``: a graph break is an error, not a slow path).

    ``torch.autograd.grad`` inside the step is traced (torch 2.13 graph-breaks on it unless
    ``torch._dynamo.config.trace_autograd_ops`` is set; the setting is scoped to the step's
    calls). ``backend``: ``True`` for inductor, or a backend name (``"aot_eager"`` traces forward
    and backward the same way without generating kernels: quicker to compile, for tests).
    """
    backend = "inductor" if backend is True else backend
    compiled = torch.compile(fn, **{"fullgraph": True, "backend": backend, **compile_kwargs})

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args, **kwargs)

    run.compiled = compiled
    return run
