import pytest
import torch

from functrain import tree
from functrain.core.metrics import Accuracy, Average, Collection


def test_average_weighted_merge_equals_direct():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=g) for n in (3, 7, 1, 12)]
    merged = Average.empty()
    for c in chunks:
        merged = merged.merge(Average.from_mean(c.mean(), c.numel()))
    direct = torch.cat(chunks).double().mean()
    assert torch.allclose(merged.compute(), direct, atol=1e-6, rtol=0)
    # merge is associative: grouping does not matter
    a, b, c = (Average.from_batch(x) for x in chunks[:3])
    assert torch.allclose(a.merge(b).merge(c).compute(), a.merge(b.merge(c)).compute())
    assert torch.isnan(Average.empty().compute())


def test_average_from_batch_weights_and_zero_count_batch():
    avg = Average.from_batch(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0]))
    assert avg.compute().item() == pytest.approx(1.5)
    # a batch with no supervised token has mean NaN (0/0): it must not poison the total
    merged = avg.merge(Average.from_mean(torch.tensor(float("nan")), 0))
    assert merged.compute().item() == pytest.approx(1.5)


def test_accuracy_ignores_minus_100_and_shift():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # predicts 1, 0, 1
    labels = torch.tensor([[1, 1, -100]])
    acc = Accuracy.from_logits(logits, labels)
    assert acc.compute().item() == pytest.approx(0.5)
    shifted = Accuracy.from_logits(logits, torch.tensor([[-100, 1, 0]]), shift=True)  # pairs (1,1), (0,0)
    assert shifted.compute().item() == 1.0
    merged = acc.merge(shifted)
    assert merged.compute().item() == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="same shape"):
        Accuracy.from_batch(torch.zeros(2), torch.zeros(3))


def test_collection_merges_by_name_and_is_a_pytree():
    col = Collection.empty(loss=Average, accuracy=Accuracy)
    col = col.merge({"loss": Average.from_batch(torch.tensor([2.0, 4.0])),
                     "accuracy": Accuracy.from_batch(torch.tensor([1, 2]), torch.tensor([1, 3]))})
    col = col.merge(Collection({"loss": Average.from_batch(torch.tensor([6.0]))}))
    out = col.compute()
    assert out["loss"].item() == pytest.approx(4.0) and out["accuracy"].item() == pytest.approx(0.5)
    assert len(tree.leaves(col)) == 4  # all state is tensors


def test_metrics_compile_without_graph_breaks():
    def step(logits, labels):
        return Accuracy.from_logits(logits, labels).merge(Accuracy.empty())

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    logits, labels = torch.randn(4, 5, 7), torch.randint(0, 7, (4, 5))
    assert torch.equal(compiled(logits, labels).compute(), step(logits, labels).compute())
