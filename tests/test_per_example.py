"""Per-example gradients against a loop of single-example gradients."""

import pytest
import torch
from torch import nn

from functrain import per_example, tree


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        return self.out(self.norm(torch.tanh(self.fc(self.emb(ids).mean(1)))))


def ce_loss(model, batch):
    return nn.functional.cross_entropy(model(batch["ids"]), batch["labels"])


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Net()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {"ids": torch.randint(0, 11, (6, 5)), "labels": torch.randint(0, 3, (6,))}
    return model, params, batch


def loop_grads(model, params, batch):
    out = []
    for i in range(batch["labels"].shape[0]):
        p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        loss = ce_loss(lambda ids: torch.func.functional_call(model, p, (ids,)),
                       {k: v[i : i + 1] for k, v in batch.items()})
        out.append(dict(zip(p, torch.autograd.grad(loss, list(p.values())))))
    return out


def test_per_example_grads_equal_loop(setup):
    model, params, batch = setup
    grads, losses = per_example.per_example_grads(model, ce_loss, params, {}, batch)
    expected = loop_grads(model, params, batch)
    for i, exp in enumerate(expected):
        for name in params:
            torch.testing.assert_close(grads[name][i], exp[name], rtol=1e-6, atol=1e-6)
    assert losses.shape == (6,)
    # The mean of per-example grads is the batch gradient.
    batch_grad = torch.func.grad(lambda p: ce_loss(lambda ids: torch.func.functional_call(model, p, (ids,)), batch))(params)
    for name in params:
        torch.testing.assert_close(grads[name].mean(0), batch_grad[name], rtol=1e-5, atol=1e-6)


def test_per_example_norms_and_clipping(setup):
    model, params, batch = setup
    grads, _ = per_example.per_example_grads(model, ce_loss, params, {}, batch)
    expected = loop_grads(model, params, batch)
    norms = per_example.per_example_norms(grads)
    for i, exp in enumerate(expected):
        torch.testing.assert_close(norms[i], tree.global_norm(exp), rtol=1e-6, atol=1e-7)
    max_norm = float(norms.median())
    clipped, _ = per_example.clip_per_example(grads, max_norm)
    new_norms = per_example.per_example_norms(clipped)
    assert torch.all(new_norms <= max_norm * (1 + 1e-5))
    small = norms <= max_norm
    torch.testing.assert_close(new_norms[small], norms[small])
    assert (~small).any(), "the test needs some examples above the clipping norm"


def test_private_grad_without_noise_is_mean_of_clipped(setup):
    model, params, batch = setup
    grads, _ = per_example.per_example_grads(model, ce_loss, params, {}, batch)
    clipped, _ = per_example.clip_per_example(grads, 0.1)
    g = per_example.private_grad(model, ce_loss, params, {}, batch, max_norm=0.1)
    for name in params:
        torch.testing.assert_close(g[name], clipped[name].mean(0))
    noisy = per_example.private_grad(model, ce_loss, params, {}, batch, max_norm=0.1, noise_multiplier=1.0,
                                     generator=torch.Generator().manual_seed(0))
    assert tree.relative_difference(noisy, g) > 1e-3


def test_per_example_bad_input(setup):
    model, params, _ = setup
    with pytest.raises(ValueError, match="disagree"):
        per_example.per_example_grads(model, ce_loss, params, {}, {"ids": torch.zeros(3, 5, dtype=torch.long),
                                                                   "labels": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="empty"):
        per_example.per_example_grads(model, ce_loss, params, {}, {"ids": torch.zeros(0, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match="max_norm"):
        per_example.clip_per_example({"w": torch.ones(2, 3)}, 0.0)
