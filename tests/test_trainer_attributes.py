"""Issue 12: every attribute of a Trainer is created in ``__init__`` (or is a class-level default);
train-time state lives in the runner hooks of one ``train()`` (functrain/trainer/train_hooks.py)."""

import ast
import inspect

import functrain.trainer.seq2seq as seq2seq_module
import functrain.trainer.trainer as trainer_module


def _attributes_set_outside_init(source: str, class_name: str) -> dict:
    """``{attribute: method}`` for each ``self.x = ...`` in a method when ``__init__`` sets no ``self.x``."""
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == class_name)
    in_init, elsewhere = set(), {}
    for fn in (f for f in cls.body if isinstance(f, ast.FunctionDef)):
        for node in ast.walk(fn):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                    and isinstance(node.value, ast.Name) and node.value.id == "self"):
                (in_init.add(node.attr) if fn.name == "__init__" else elsewhere.setdefault(node.attr, fn.name))
    return {name: fn for name, fn in elsewhere.items() if name not in in_init}


def test_trainer_attributes_are_created_in_init():
    assert _attributes_set_outside_init(inspect.getsource(trainer_module), "Trainer") == {}
    assert _attributes_set_outside_init(inspect.getsource(seq2seq_module), "Seq2SeqTrainer") == {}


def test_the_check_sees_an_attribute_created_outside_init():
    source = "class T:\n    def __init__(self):\n        self.a = 1\n    def train(self):\n        self.a, self.b = 2, 3\n"
    assert _attributes_set_outside_init(source, "T") == {"b": "train"}
