"""Which parameters get weight decay: the Hugging Face Trainer's rule, as a mask.

``transformers.Trainer.get_decay_parameter_names`` (transformers 5.x) decays every parameter
except those inside an ``nn.LayerNorm`` and those whose lower-cased name matches one of
``bias``, ``layernorm``, ``rmsnorm``, ``(^|.)norm($|.)``, ``_norm($|.)``. That covers biases,
LayerNorm, and the RMSNorm / GroupNorm / BatchNorm layers that models name ``*norm*``
(``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``ln_f`` is an ``nn.LayerNorm``).
Embeddings are decayed, as in the Trainer. The rule is reimplemented here (no transformers import)
and tested against the Trainer's own function.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from .. import tree

NO_DECAY_LAYER_TYPES: tuple[type, ...] = (nn.LayerNorm,)
NO_DECAY_NAME_PATTERNS: tuple[str, ...] = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters that get weight decay."""
    patterns = [re.compile(p) for p in NO_DECAY_NAME_PATTERNS]
    inside_norm_layer = set()
    for module_name, module in model.named_modules():
        if isinstance(module, NO_DECAY_LAYER_TYPES):
            prefix = f"{module_name}." if module_name else ""
            inside_norm_layer.update(prefix + n for n, _ in module.named_parameters(remove_duplicate=False))
    names = set()
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name not in inside_norm_layer and not any(p.search(name.lower()) for p in patterns):
            names.add(name)
    return names


def default_weight_decay_mask(model: nn.Module, decay_names=None) -> Callable[[dict], dict]:
    """A mask function ``params -> {name: bool}``: True where the HF Trainer applies weight decay.

    Use it as ``adamw(..., mask=default_weight_decay_mask(model))``. ``params`` is the flat
    ``{name: tensor}`` dict of :class:`functrain.TrainState` (or any pytree whose dotted leaf
    paths are the model's parameter names); a name the model does not have raises ``ValueError``.
    ``decay_names``: the parameters to decay (default :func:`decay_parameter_names`).
    """
    decay = set(decay_names) if decay_names is not None else decay_parameter_names(model)
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)}

    def mask(params) -> dict:
        names = tree.paths(params)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"default_weight_decay_mask: parameter name(s) {unknown[:5]} are not parameters of "
                f"{type(model).__name__}; the mask must be built from the model the params come from"
            )
        return _mask_by_name(params, decay)

    return mask


def _mask_by_name(node, decay: set[str], prefix: str = ""):
    """``node`` with each tensor replaced by ``name in decay``, names being dotted key paths.

    Built by walking dicts and sequences by key, not by leaf order: under ``torch.compile``
    dynamo's ``tree_map`` visits dict entries in insertion order rather than optree's sorted order.
    """
    if isinstance(node, dict):
        return type(node)((k, _mask_by_name(v, decay, f"{prefix}{k}.")) for k, v in node.items())
    if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
        return type(node)(_mask_by_name(v, decay, f"{prefix}{i}.") for i, v in enumerate(node))
    if node is None:
        return None
    if hasattr(node, "_fields"):  # NamedTuple: fields by name
        return type(node)(*(_mask_by_name(getattr(node, f), decay, f"{prefix}{f}.") for f in node._fields))
    return prefix[:-1] in decay
