"""The fused linear + cross-entropy loss equals the plain one (loss and gradients, <= 1e-5)."""

import pytest
import torch
from torch import nn

from functrain.step.fused_loss import causal_lm_fused_loss, fused_linear_cross_entropy


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("bias, chunk", [(False, 16), (True, 7), (False, None)])
def test_loss_and_grads_match_plain_cross_entropy(bias, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 12, generator=g, requires_grad=True)
    weight = torch.randn(40, 12, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(0, 40, (50,), generator=g)
    labels[::5] = -100
    plain = nn.functional.cross_entropy(nn.functional.linear(hidden, weight, b), labels)
    ref = torch.autograd.grad(plain * 3.0, [t for t in (hidden, weight, b) if t is not None])
    fused = fused_linear_cross_entropy(hidden, weight, labels, b, chunk_size=chunk)
    got = torch.autograd.grad(fused * 3.0, [t for t in (hidden, weight, b) if t is not None])
    assert abs(float(fused - plain)) <= 1e-5 * abs(float(plain))
    for x, y in zip(got, ref):
        assert _rel(x, y) <= 1e-5
    with torch.no_grad():  # evaluation path: loss only
        assert abs(float(fused_linear_cross_entropy(hidden, weight, labels, b, chunk_size=chunk) - plain)) <= 1e-5


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True])
def test_causal_lm_fused_loss_matches_the_models_own_loss_in_a_train_step(compile):
    from functrain import TrainState, make_train_step
    import functrain.optim as optim

    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (3, 16), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    tx = optim.sgd(0.5)  # (Adam would amplify rounding in near-zero gradients into lr-sized steps)
    plain_step = make_train_step(model, tx)
    fused_step = make_train_step(model, tx, causal_lm_fused_loss, compile=compile)
    a = TrainState.create(model, tx, copy=True)
    b = TrainState.create(model, tx, copy=True)
    for _ in range(4):
        a, ma = plain_step(a, batch)
        b, mb = fused_step(b, batch)
        assert abs(float(ma["loss"] - mb["loss"])) <= 1e-5 * float(ma["loss"])
        assert float(ma["grad_norm"]) == pytest.approx(float(mb["grad_norm"]), rel=1e-5)
    worst = max(_rel(b.params[k], a.params[k]) for k in a.params)
    assert worst <= 1e-5


def test_refuses_models_without_a_linear_head():
    with pytest.raises(TypeError, match="causal LM"):
        causal_lm_fused_loss(nn.Linear(2, 2), {"labels": torch.zeros(1)})
