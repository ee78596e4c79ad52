"""The flat step's bookkeeping: a state's tensors as segment buffers in, per-name views out.

:func:`functrain.make_train_step` with ``flat=True`` runs its core (the same ``train_core``) on
segment buffers (:mod:`functrain.core.flat`): the forward binds views of them, the gradients are
packed into segments, and ``tx`` updates a few long buffers instead of one tensor per parameter.
Here: finding the segments under a state's views (host metadata only, no copy), copying a state
that is not flat yet into segments (once), one compiled core per layout, and the new state's
per-name views.
"""

from __future__ import annotations

from typing import Callable

from functrain.core.flat import FlatLayout, param_buffers, plan_layout


class FlatCores:
    """One core per layout (``build(layout)``, compiled or not) and the conversions around it."""

    def __init__(self, tx, build: Callable[[FlatLayout], Callable], pieces: int = 1):
        self.tx = tx
        self.pieces = pieces
        self.build = build
        self.layouts: dict[tuple, FlatLayout] = {}
        self.cores: dict[FlatLayout, Callable] = {}
        # The state the last step returned, and its segments: the next call gets that state
        # (donated: the same dicts; pure: the views made in finish), so checking every view's
        # storage again is skipped. States are immutable: their dicts are not edited in place.
        self.last: tuple | None = None

    def layout_for(self, params) -> FlatLayout:
        key = tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in params.items())
        layout = self.layouts.get(key)
        if layout is None:
            layout = self.layouts[key] = plan_layout(params, self.tx, self.pieces)
        return layout

    def prepare(self, state):
        """``(segment params, segment opt_state, core, templates)`` for ``state``; ``templates``:
        the per-name ``(params, opt_state)`` whose storages the segments are (a flat copy of
        ``state``'s when it was not flat)."""
        last = self.last
        if last is not None and last[0] is state.params and last[1] is state.opt_state:
            return last[2]
        layout = self.layout_for(state.params)
        names = frozenset(state.params)
        params, opt_state = state.params, state.opt_state
        seg_params = param_buffers(params, layout)
        seg_opt = layout.segment_dicts(opt_state, names) if seg_params is not None else None
        if seg_opt is None:  # not flat (yet): lay it out once; the returned state stays flat
            params, opt_state = layout.flatten(params, names), layout.flatten(opt_state, names)
            seg_params, seg_opt = param_buffers(params, layout), layout.segment_dicts(opt_state, names)
        core = self.cores.get(layout)
        if core is None:
            core = self.cores[layout] = self.build(layout)
        return seg_params, seg_opt, core, (layout, params, opt_state)

    def finish(self, prepared, seg_params, seg_opt, donate: bool):
        """The per-name ``(params, opt_state)`` after the core: with donation the templates
        themselves (their storages were written), else views of the new segments."""
        old_params, old_opt, core, (layout, params, opt_state) = prepared
        if donate:
            self.last = (params, opt_state, prepared)
            return params, opt_state
        new_params = layout.views(seg_params, keys=list(params))
        new_opt = layout.name_dicts(opt_state, seg_opt, frozenset(params))
        self.last = (new_params, new_opt, (seg_params, seg_opt, core, (layout, new_params, new_opt)))
        return new_params, new_opt
