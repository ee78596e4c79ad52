"""functrain.tree helpers against torch references and hand computations."""

from typing import NamedTuple

import pytest
import torch

import functrain as ft
from functrain import tree


class Pair(NamedTuple):
    first: torch.Tensor
    second: dict


def sample_tree(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g, dtype=dtype),
        "nested": Pair(torch.randn(5, generator=g, dtype=dtype), {"b": torch.randn(2, 2, generator=g, dtype=dtype)}),
        "count": torch.tensor(3),
        "empty": None,
    }


def floating_leaves(t):
    return [x for x in tree.leaves(t) if x.is_floating_point()]


# -- norms and finiteness ------------------------------------------------------------------------


def test_global_norm_matches_torch_and_hand_computation():
    t = {k: v for k, v in sample_tree().items() if k != "count"}
    got = tree.global_norm(t)
    assert got.dtype == torch.float32 and got.ndim == 0
    ls = tree.leaves(t)
    torch.testing.assert_close(got, torch.nn.utils.get_total_norm(ls), rtol=1e-6, atol=0)
    by_hand = torch.sqrt(sum((x.double() ** 2).sum() for x in ls))
    torch.testing.assert_close(got.double(), by_hand, rtol=1e-6, atol=0)


def test_global_norm_of_mixed_dtypes_is_fp32():
    t = {"a": torch.full((10,), 3.0, dtype=torch.bfloat16), "b": torch.full((10,), 4.0)}
    got = tree.global_norm(t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(10 * 3.0**2 + 10 * 4.0**2).sqrt(), rtol=1e-6, atol=0)
    assert tree.global_norm({}).item() == 0.0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_detects_any_bad_element(bad, dtype):
    t = sample_tree(dtype=dtype)
    assert tree.all_finite(t).item() is True
    t["nested"].second["b"][1, 0] = bad
    result = tree.all_finite(t)
    assert result.dtype == torch.bool and result.ndim == 0 and result.item() is False


def test_all_finite_is_true_for_large_finite_values():
    # Regression: an l2-norm based check overflowed to inf here.
    big = torch.finfo(torch.float32).max / 2
    assert tree.all_finite({"a": torch.full((4,), big), "b": torch.full((1,), -big)}).item() is True
    assert tree.all_finite({"a": torch.full((3,), 60000.0, dtype=torch.float16)}).item() is True
    assert tree.all_finite({}).item() is True
    assert tree.all_finite({"empty": torch.zeros(0), "x": torch.ones(2)}).item() is True


def test_all_finite_compiles_without_graph_breaks():
    torch._dynamo.reset()
    check = torch.compile(tree.all_finite, fullgraph=True, backend="eager")
    t = sample_tree()
    assert check(t).item() is True
    t["w"][0, 0] = float("nan")
    assert check(t).item() is False


# -- leaf-wise ops -------------------------------------------------------------------------------


def test_where_picks_a_whole_tree_and_keeps_structure():
    a, b = sample_tree(0), sample_tree(1)
    for cond, expected in ((torch.tensor(True), a), (torch.tensor(False), b)):
        out = tree.where(cond, a, b)
        assert type(out["nested"]) is Pair and out["empty"] is None
        assert tree.tensors_equal(out, expected)


def test_cast_changes_only_floating_leaves_by_default():
    t = sample_tree()
    half = tree.cast(t, torch.bfloat16)
    assert type(half["nested"]) is Pair
    assert all(x.dtype == torch.bfloat16 for x in floating_leaves(half))
    assert half["count"].dtype == torch.int64 and half["count"] is t["count"]
    everything = tree.cast(t, torch.float64, only_floating=False)
    assert all(x.dtype == torch.float64 for x in tree.leaves(everything))
    assert t["w"].dtype == torch.float32  # input untouched


def test_relative_difference_matches_hand_computation():
    a, b = sample_tree(0), sample_tree(1)
    la, lb = tree.leaves(a), tree.leaves(b)
    num = torch.sqrt(sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(la, lb)))
    den = torch.sqrt(sum((y.double() ** 2).sum() for y in lb))
    assert tree.relative_difference(a, b) == pytest.approx(float(num / den), rel=1e-12)
    assert tree.relative_difference(a, tree.clone(a)) == 0.0


def test_scale_add_sub_copy_match_per_leaf_ops():
    a, b = sample_tree(0), sample_tree(1)
    for got, op in (
        (tree.scale(a, 0.5), lambda x, y: x * 0.5),
        (tree.add(a, b), torch.add),
        (tree.sub(a, b), torch.sub),
    ):
        assert type(got["nested"]) is Pair
        for g, x, y in zip(tree.leaves(got), tree.leaves(a), tree.leaves(b)):
            torch.testing.assert_close(g, op(x, y), rtol=0, atol=0)
    dst = tree.zeros_like(a)
    tree.copy_(dst, b)
    assert tree.tensors_equal(dst, b)


def test_size_and_nbytes():
    t = sample_tree()
    assert tree.size(t) == 12 + 5 + 4 + 1
    assert tree.nbytes(t) == (12 + 5 + 4) * 4 + 8


# -- structure -----------------------------------------------------------------------------------


def test_paths_name_leaves_by_keys_indices_and_fields():
    t = sample_tree()
    assert tree.paths(t) == ["count", "nested.0", "nested.1.b", "w"]
    assert tree.named_leaves(t)["nested.1.b"] is t["nested"].second["b"]


def test_flatten_unflatten_keeps_adamw_state_types():
    params = sample_tree()
    del params["count"], params["empty"]
    opt_state = ft.optim.adamw(1e-3).init(params)
    leaves, treedef = tree.flatten(opt_state)
    rebuilt = tree.unflatten(treedef, leaves)
    assert [type(s) for s in rebuilt] == [type(s) for s in opt_state]
    assert type(rebuilt[0].mu["nested"]) is Pair
    assert tree.structure(rebuilt) == tree.structure(opt_state)
    assert all(x is y for x, y in zip(tree.leaves(rebuilt), tree.leaves(opt_state)))


def test_assert_same_structure_names_the_differing_leaves():
    a = {"encoder": {"w": torch.ones(1), "b": torch.ones(1)}, "head": torch.ones(1)}
    b = {"encoder": {"w": torch.ones(1), "bias": torch.ones(1)}, "head": torch.ones(1)}
    tree.assert_same_structure(a, tree.clone(a))
    with pytest.raises(ValueError, match=r"params and grads .*only in params: \['encoder.b'\], "
                                         r"only in grads: \['encoder.bias'\]"):
        tree.assert_same_structure(a, b, "params", "grads")
    with pytest.raises(ValueError, match="same leaf names, different containers"):
        tree.assert_same_structure({"x": (torch.ones(1),)}, {"x": [torch.ones(1)]})


def test_tensors_equal_is_strict():
    a = sample_tree()
    assert tree.tensors_equal(a, tree.clone(a))
    b = tree.clone(a)
    b["w"][0, 0] += 1e-6
    assert not tree.tensors_equal(a, b)
    assert not tree.tensors_equal(a, {"w": a["w"]})
