"""default_weight_decay_mask follows transformers.Trainer.get_decay_parameter_names exactly."""

import pytest
import torch
from torch import nn

import functrain.core.optim as optim


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=16))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))


class Custom(nn.Module):
    """Norm layers named without 'norm', and ones named with it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.ln = nn.LayerNorm(4)  # excluded by type
        self.gn = nn.GroupNorm(2, 4)  # a GroupNorm not named *norm*: the Trainer decays it
        self.final_norm = nn.BatchNorm1d(4)  # excluded by name (_norm)
        self.proj = nn.Linear(4, 4)


@pytest.mark.parametrize("build", [_gpt2, _bert, _llama, Custom], ids=["gpt2", "bert", "llama", "custom"])
def test_matches_trainer_get_decay_parameter_names(build):
    from transformers import Trainer

    torch.manual_seed(0)
    model = build()
    expected = set(Trainer.get_decay_parameter_names(None, model))  # does not use self
    names = {n for n, _ in model.named_parameters()}
    assert optim.decay_parameter_names(model) & names == expected & names
    mask = optim.default_weight_decay_mask(model)({n: p for n, p in model.named_parameters()})
    assert {n for n, m in mask.items() if m} == expected & names
    assert any(mask.values()) and not all(mask.values())


def test_llama_rmsnorm_and_biases_not_decayed():
    model = _llama()
    decay = optim.decay_parameter_names(model)
    assert "model.norm.weight" not in decay
    assert "model.layers.0.input_layernorm.weight" not in decay
    assert "model.layers.0.self_attn.q_proj.weight" in decay
    assert "model.embed_tokens.weight" in decay  # the Trainer decays embeddings


def test_mask_rejects_params_of_another_model():
    mask = optim.default_weight_decay_mask(Custom())
    with pytest.raises(ValueError, match="not parameters of Custom"):
        mask({"emb.weight": torch.zeros(8, 4), "decoder.weight": torch.zeros(2)})
