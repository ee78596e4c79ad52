"""Tiny models shared by the step tests: an MLP, a small GPT with dropout, HF GPT2/BERT configs."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64


class MLP(nn.Module):
    """Classifier: ``forward(x, labels=None)`` returns ``{"logits", "loss"}`` like an HF model."""

    def __init__(self, d_in=8, hidden=16, classes=4, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x, labels=None):
        logits = self.fc2(self.drop(torch.tanh(self.fc1(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Block(nn.Module):
    def __init__(self, d, heads, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A causal LM with tied embeddings and dropout; ``forward(input_ids, labels=None)``.

    Its loss shifts the labels, so it is named ``...ForCausalLM`` and the default item count
    uses ``labels[..., 1:]``.
    """

    def __init__(self, vocab=VOCAB, d=32, heads=2, layers=1, block=16, dropout=0.1):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        nn.init.normal_(self.wte.weight, std=0.02)
        self.register_buffer("pos", torch.arange(block), persistent=False)

    def forward(self, input_ids, labels=None):
        t = input_ids.shape[1]
        x = self.drop(self.wte(input_ids) + self.wpe(self.pos[:t]))
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                          ignore_index=-100)
        return out


class TinyGPTForCausalLM(TinyGPT):
    pass


def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)


def gpt2(dropout=0.0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet_transformers()
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     attn_implementation="eager", **kw)
    return GPT2LMHeadModel(cfg)


def bert_classifier(num_labels=3, dropout=0.0, **kw):
    from transformers import BertConfig, BertForSequenceClassification

    _quiet_transformers()
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                     attn_implementation="eager", **kw)
    return BertForSequenceClassification(cfg)


def lm_batch(n=8, t=16, seed=0, pad_rows=None):
    """Token batch; ``pad_rows={row: n_pad}`` sets the last ``n_pad`` labels of a row to -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    labels = ids.clone()
    for row, n_pad in (pad_rows or {}).items():
        labels[row, t - n_pad:] = -100
    return {"input_ids": ids, "labels": labels}


def cls_batch(n=8, d=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, d, generator=g), "labels": torch.randint(0, classes, (n,), generator=g)}


def moved_state(model, tx, scale: float = 0.01):
    """A ``TrainState`` whose params are a copy of the module's moved by ``scale`` x N(0, 1): a step
    that read the module's own tensors instead of the state's would give other numbers."""
    import functrain as ft

    state = ft.TrainState.create(model, tx, copy=True)
    g = torch.Generator().manual_seed(1)
    return state.replace(params={k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.params.items()})
