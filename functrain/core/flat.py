"""Flat storage: params and optimizer state packed in a few contiguous buffers.

An optimizer update is memory-bound; what it costs beyond the bytes it moves is one kernel launch
(and, on CPU, one parallel region) per tensor per operation: with 200 tensors and ~10 operations,
thousands. Packed flat, the same update is a handful of kernels over long contiguous buffers
(what apex's multi-tensor apply, DeepSpeed's flat buffers and FSDP's flat-param do).

A flat state looks like any other: ``state.params`` is still ``{name: tensor}`` and every
per-parameter entry of the optimizer state (``mu``, ``nu``, ...) is still ``{name: tensor}``, so
checkpoints (same names, same shapes), masks and tree utilities see no difference. The tensors
are views into *segments*: one contiguous 1-D buffer per group of parameters with the same dtype,
device and optimizer treatment (the same masks and partition labels), the params of a group
laid out in order. A step built with ``make_train_step(..., flat=True)`` runs the optimizer
transformation on the segments (``{first name of the segment: 1-D buffer}``), so every
``_foreach`` op of the update, the global norm and clipping touch a few tensors, not hundreds.

That is exact for *elementwise* transformations (each element's update reads only its own
gradient, state and value, plus shared scalars and masks): Adam(W), SGD with momentum, Lion,
RMSprop, Adagrad, global-norm clipping. A transformation that works per tensor (trust ratios
such as LAMB, Adafactor's factored moments, Muon, GaLore) would see a segment as one tensor:
:func:`plan_layout` refuses a state that is not shaped like the params, the others are the
caller's to avoid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


__all__ = ["FlatLayout", "Segment", "flatten_state", "is_flat", "plan_layout"]


@dataclasses.dataclass(frozen=True)
class Segment:
    """Parameters stored back to back in one 1-D buffer; ``names[0]`` names the segment."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype  # the params' (a state's moments may be stored in another dtype)
    device: torch.device

    @property
    def key(self) -> str:
        return self.names[0]

    @property
    def numel(self) -> int:
        return sum(self.sizes)


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """The segments of a params dict, and the dict's own key order. Hashable: it keys compiled steps."""

    segments: tuple[Segment, ...]
    order: tuple[str, ...]

    # -- between per-name dicts and segment dicts ----------------------------------------------
    def views(self, segments: Mapping, keys=None) -> dict:
        """``{name: view}`` into ``segments`` (``{segment key: 1-D buffer}``), in ``keys``' order
        (default: the params' order); a segment missing from ``segments`` is left out."""
        out = {}
        for seg in self.segments:
            if seg.key in segments:
                for name, piece, shape in zip(seg.names, segments[seg.key].split(seg.sizes), seg.shapes):
                    out[name] = piece.view(shape)
        return {k: out[k] for k in (keys if keys is not None else self.order) if k in out}

    def pack(self, per_name: Mapping) -> dict:
        """``{segment key: 1-D tensor}``, a copy of ``per_name``'s tensors laid out as the segments."""
        return {seg.key: torch.cat([per_name[n].reshape(-1) for n in seg.names])
                for seg in self.segments if seg.key in per_name}

    def buffers(self, per_name: Mapping) -> dict | None:
        """``{segment key: 1-D buffer}`` that ``per_name``'s tensors are views of, or ``None`` when
        they are not laid out as the segments (no copy; host metadata only)."""
        out = {}
        for seg in self.segments:
            present = [n in per_name for n in seg.names]
            if not any(present):
                continue
            if not all(present):
                return None
            buf = _segment_buffer(seg, [per_name[n] for n in seg.names])
            if buf is None:
                return None
            out[seg.key] = buf
        return out if _covers(self, out, per_name) else None

    def segment_dicts(self, node, names: frozenset):
        """``node`` (a pytree) with every per-parameter dict replaced by its segment buffers,
        or ``None`` when one of them is not laid out flat."""
        if _is_per_name(node, names):
            return self.buffers(node)
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                out[k] = self.segment_dicts(v, names)
                if out[k] is None and v is not None:
                    return None
            return type(node)(out)
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            children = [self.segment_dicts(v, names) for v in node]
            if any(c is None and v is not None for c, v in zip(children, node)):
                return None
            return type(node)(*children)
        if isinstance(node, (list, tuple)):
            children = [self.segment_dicts(v, names) for v in node]
            if any(c is None and v is not None for c, v in zip(children, node)):
                return None
            return type(node)(children)
        return node

    def name_dicts(self, template, node, names: frozenset):
        """The inverse of :meth:`segment_dicts`: ``node`` (shaped like the segment form of
        ``template``) with each segment dict turned back into per-name views in ``template``'s order."""
        if _is_per_name(template, names):
            return self.views(node, keys=list(template))
        if isinstance(template, dict):
            return type(template)((k, self.name_dicts(template[k], node[k], names)) for k in template)
        if isinstance(template, tuple) and hasattr(template, "_fields"):
            return type(template)(*(self.name_dicts(t, n, names) for t, n in zip(template, node)))
        if isinstance(template, (list, tuple)):
            return type(template)(self.name_dicts(t, n, names) for t, n in zip(template, node))
        return node

    def flatten(self, node, names: frozenset):
        """``node`` with every per-parameter dict copied into fresh segment buffers (views returned)."""
        if _is_per_name(node, names):
            return self.views(self.pack(node), keys=list(node))
        if isinstance(node, dict):
            return type(node)((k, self.flatten(v, names)) for k, v in node.items())
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(self.flatten(v, names) for v in node))
        if isinstance(node, (list, tuple)):
            return type(node)(self.flatten(v, names) for v in node)
        return node


def _covers(layout: FlatLayout, found: dict, per_name: Mapping) -> bool:
    """Every name of ``per_name`` belongs to a segment found."""
    return sum(len(s.names) for s in layout.segments if s.key in found) == len(per_name)


def _segment_buffer(seg: Segment, tensors: list) -> torch.Tensor | None:
    """The 1-D buffer ``tensors`` tile back to back in one storage (a view of it), or ``None``."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return None
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for t, shape, size in zip(tensors, seg.shapes, seg.sizes):
        if (t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset or tuple(t.shape) != shape
                or not t.is_contiguous() or t.dtype != first.dtype):
            return None
        offset += size
    return first.as_strided((seg.numel,), (1,), first.storage_offset())


def _is_per_name(node, names: frozenset) -> bool:
    """A dict keyed by parameter names: the per-parameter part of an optimizer state (or the params)."""
    return isinstance(node, dict) and bool(node) and set(node) <= names


# -- planning a layout -----------------------------------------------------------------------------


def plan_layout(params: Mapping, tx=None, pieces: int = 1) -> FlatLayout:
    """The segments for ``params``: consecutive runs of parameters with the same dtype, device and,
    when ``tx`` is given, the same treatment by its ``masked``/``partition`` selections (recorded
    while ``tx.init`` runs on meta tensors), parameters of one kind gathered in first-seen order.
    ``pieces > 1`` cuts each kind into runs of about ``1 / pieces`` of all elements (at parameter
    boundaries), so an update can run a segment at a time (a donated eager step's memory).

    Raises ``ValueError`` when ``tx`` cannot run over segments: a selection that answers differently
    for a segment than for its parameters (a function of shapes rather than names), or a
    per-parameter state that is not shaped like its parameter (not elementwise).
    """
    names = list(params)
    signature = _selections(tx, params) if tx is not None else {}
    kinds: dict[Any, list[str]] = {}
    for n in names:
        p = params[n]
        kinds.setdefault((p.dtype, p.device, signature.get(n)), []).append(n)
    budget = max(1, sum(p.numel() for p in params.values()) // pieces)
    runs = [run for ns in kinds.values() for run in _cut(ns, [params[n].numel() for n in ns], budget)]
    segments = tuple(Segment(tuple(ns), tuple(tuple(params[n].shape) for n in ns), tuple(params[n].numel() for n in ns),
                             params[ns[0]].dtype, params[ns[0]].device) for ns in runs)
    layout = FlatLayout(segments, tuple(names))
    if tx is not None:
        _check_over_segments(layout, tx, params, signature)
        _check_same_update(layout, tx, params)
    return layout


def _cut(names: list, sizes: list, budget: int) -> list[list]:
    """``names`` in consecutive runs of at most ``budget`` elements (a larger tensor alone)."""
    runs, current, size = [], [], 0
    for n, k in zip(names, sizes):
        if current and size + k > budget:
            runs.append(current)
            current, size = [], 0
        current.append(n)
        size += k
    return runs + [current] if current else runs


def _meta(params: Mapping) -> dict:
    return {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in params.items()}


def _selections(tx, params: Mapping) -> dict:
    """``{name: tuple of the masks/labels that tx's masked/partition give it}``, from an init on meta tensors."""
    from functrain.core.optim.combine import recording_selections

    with recording_selections() as log:
        state = tx.init(_meta(params))
    _check_elementwise_state(state, params)
    return {n: tuple(entry.get(n) for entry in log) for n in params}


def _check_elementwise_state(state, params: Mapping) -> None:
    names = frozenset(params)

    def visit(node):
        if _is_per_name(node, names):
            for n, t in node.items():
                if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(params[n].shape):
                    raise ValueError(
                        f"flat=True needs an elementwise optimizer (Adam(W), SGD, Lion, RMSprop, Adagrad, ...): its "
                        f"state for {n!r} has shape {tuple(t.shape)}, not the parameter's {tuple(params[n].shape)}; "
                        "use flat=False for this optimizer")
        elif isinstance(node, dict):
            for v in node.values():
                visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)

    visit(state)


def _check_over_segments(layout: FlatLayout, tx, params: Mapping, signature: dict) -> None:
    """``tx``'s selections, run over the segments, give each segment its parameters' answer."""
    from functrain.core.optim.combine import recording_selections

    segs = {s.key: torch.empty((s.numel,), dtype=params[s.key].dtype, device="meta") for s in layout.segments}
    try:
        with recording_selections() as log:
            tx.init(segs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"flat=True: the optimizer cannot be set up over flat segments ({e}); masks and partition "
                         "labels must be functions of the params (e.g. default_weight_decay_mask(model)), not "
                         "pytrees of values; or use flat=False") from e
    got = {k: tuple(entry.get(k) for entry in log) for k in segs}
    for key, sig in got.items():
        if sig != signature[key]:
            raise ValueError(f"flat=True: a masked()/partition() selection of the optimizer answers differently for the "
                             f"flat segment starting at {key!r} than for the parameter itself (it depends on the "
                             "tensor's shape, not its name); select by name, or use flat=False")


def _check_same_update(layout: FlatLayout, tx, params: Mapping, steps: int = 2) -> None:
    """Two updates of ``tx`` on small stand-ins of the params (each dimension cut to 3), per tensor
    and over segments, agree: ``tx`` is elementwise. A per-tensor norm or shape (LAMB, LARS, Muon)
    would see a segment as one tensor and give other numbers."""
    from functrain.core.optim.base import apply_updates, update_with_extra_args

    g = torch.Generator().manual_seed(0)

    def like(p):
        return torch.randn(tuple(min(d, 3) for d in p.shape), generator=g).to(p.dtype)

    small = {n: like(p) for n, p in params.items()}
    small_layout = FlatLayout(tuple(dataclasses.replace(s, shapes=tuple(tuple(small[n].shape) for n in s.names),
                                                        sizes=tuple(small[n].numel() for n in s.names), device="cpu")
                                    for s in layout.segments), layout.order)
    per_name, segs = small, small_layout.pack(small)
    state_n, state_s = tx.init(per_name), tx.init(segs)
    value = torch.zeros(())
    for _ in range(steps):
        grads = {n: torch.randn(p.shape, generator=g).to(p.dtype) for n, p in small.items()}
        u, state_n = update_with_extra_args(tx, grads, state_n, per_name, value=value)
        per_name = apply_updates(per_name, u)
        u, state_s = update_with_extra_args(tx, small_layout.pack(grads), state_s, segs, value=value)
        segs = apply_updates(segs, u)
    start, expected = small_layout.pack(small), small_layout.pack(per_name)
    moved = {k: (expected[k].double() - start[k].double()) for k in segs}  # compare the updates, not the params
    diff = max(float((segs[k].double() - expected[k].double()).abs().max() / moved[k].abs().max().clamp_min(1e-30))
               for k in segs)
    if not diff <= 1e-3:
        raise ValueError(f"flat=True needs an elementwise optimizer: over flat segments its update differs from the "
                         f"per-tensor update (relative difference {diff:.1e}; a per-tensor norm or shape, as in LAMB, "
                         "LARS, Muon?); use flat=False for this optimizer")


# -- flat states -----------------------------------------------------------------------------------


def param_buffers(params: Mapping, layout: FlatLayout) -> dict | None:
    """``params``' segment buffers when they are views laid out as ``layout`` (dtypes and devices
    included), else ``None``."""
    found = layout.buffers(params)
    if found is None or any(found[s.key].dtype != s.dtype or found[s.key].device != s.device
                            for s in layout.segments):
        return None
    return found


def is_flat(params: Mapping, layout: FlatLayout) -> bool:
    """Whether ``params`` are views laid out as ``layout``'s segments."""
    return param_buffers(params, layout) is not None


def flatten_state(state, tx, model: nn.Module | None = None):
    """``state`` with params and per-parameter optimizer state copied into flat segments
    (:func:`plan_layout` with ``tx``); names, shapes and values unchanged.

    With ``model``, the module's parameters are rebound (``param.data``) to the new views, so the
    module keeps using the state's storage (and a donated step keeps it current).
    """
    layout = plan_layout(state.params, tx)
    names = frozenset(state.params)
    params = layout.flatten(state.params, names)
    opt_state = layout.flatten(state.opt_state, names)
    if model is not None:
        share_with_module(model, params)
    return state.replace(params=params, opt_state=opt_state)


def share_with_module(model: nn.Module, params: Mapping) -> None:
    """Rebind ``model``'s parameters of those names to ``params``' tensors (same storage, no copy)."""
    own = dict(model.named_parameters())
    for name, t in params.items():
        if name not in own:
            raise ValueError(f"share_with_module: {name!r} is not a parameter of {type(model).__name__}")
        with torch.no_grad():
            own[name].data = t

