import random

import numpy as np
import pytest
import torch
import transformers

from functrain.data.collators import (
    CollateError,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    default_data_collator,
)
from tests._tiny_tokenizer import make_tokenizer


def _features(n=6, with_labels=True, seed=0):
    rng = random.Random(seed)
    tok = make_tokenizer()
    feats = []
    for i in range(n):
        text = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 11)))
        f = dict(tok(text))
        if with_labels:
            f["label"] = i % 3
        feats.append(f)
    return feats


def _assert_same(a, b):
    assert set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
        assert torch.as_tensor(a[k]).dtype == torch.as_tensor(b[k]).dtype, k


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("multiple", [None, 8])
def test_padding_matches_transformers(side, multiple):
    tok = make_tokenizer(side)
    feats = _features()
    ours = DataCollatorWithPadding(tok, pad_to_multiple_of=multiple)(feats)
    theirs = transformers.DataCollatorWithPadding(tok, pad_to_multiple_of=multiple)(feats)
    _assert_same(ours, dict(theirs))
    if multiple:
        assert ours["input_ids"].shape[1] % multiple == 0


def test_padding_without_tokenizer_equals_with_tokenizer():
    tok = make_tokenizer()
    feats = [{k: v for k, v in f.items() if k != "attention_mask"} for f in _features()]
    plain = DataCollatorWithPadding(pad_token_id=tok.pad_token_id)(feats)
    _assert_same(plain, dict(transformers.DataCollatorWithPadding(tok)(feats)))
    assert plain["attention_mask"].sum() == sum(len(f["input_ids"]) for f in feats)


@pytest.mark.parametrize("multiple", [None, 4])
def test_causal_lm_matches_transformers(multiple):
    tok = make_tokenizer()
    feats = _features(with_labels=False)
    ours = DataCollatorForLanguageModeling(tok, mlm=False, pad_to_multiple_of=multiple)(feats)
    theirs = transformers.DataCollatorForLanguageModeling(tok, mlm=False, pad_to_multiple_of=multiple)(feats)
    _assert_same(ours, dict(theirs))
    assert (ours["labels"] == -100).sum() == (ours["attention_mask"] == 0).sum()
    # plain token lists, no tokenizer: same tensors
    lists = [f["input_ids"] for f in feats]
    plain = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, pad_to_multiple_of=multiple)(lists)
    assert torch.equal(plain["labels"], theirs["labels"])


def test_mlm_same_seed_same_masks_as_transformers():
    tok = make_tokenizer()
    feats = _features(n=32, with_labels=False)
    ours = DataCollatorForLanguageModeling(tok, mlm=True, seed=123)(feats)
    theirs = transformers.DataCollatorForLanguageModeling(tok, mlm=True, seed=123)(feats)
    _assert_same(ours, dict(theirs))


def test_mlm_rates_without_tokenizer():
    # 400 x 128 = 51,200 tokens: binomial std of the 15% rate is ~0.16 percentage points
    vocab, mask_id, pad_id = 1000, 3, 0
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(10, vocab, (128,), generator=g).tolist() for _ in range(400)]
    coll = DataCollatorForLanguageModeling(pad_token_id=pad_id, mlm=True, mask_token_id=mask_id, vocab_size=vocab, seed=1)
    batch = coll([{"input_ids": s} for s in seqs])
    original = torch.tensor(seqs)
    selected = batch["labels"] != -100
    assert torch.equal(batch["labels"][selected], original[selected])
    rate = selected.float().mean().item()
    assert abs(rate - 0.15) < 0.01, rate
    n = selected.sum().item()
    masked = (batch["input_ids"] == mask_id) & selected
    unchanged = (batch["input_ids"] == original) & selected
    random_ = selected & ~masked & ~unchanged
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    # a random replacement equals the original 1/vocab of the time, so "unchanged" is ~10.01%
    assert abs(unchanged.sum().item() / n - 0.1) < 0.015
    assert abs(random_.sum().item() / n - 0.1) < 0.015
    assert torch.equal(batch["input_ids"][~selected], original[~selected])


def test_mlm_never_masks_special_or_padding():
    coll = DataCollatorForLanguageModeling(pad_token_id=0, mlm=True, mlm_probability=1.0, mask_token_id=3,
                                           vocab_size=50, special_token_ids=[0, 1, 2], seed=0)
    batch = coll([{"input_ids": [1, 7, 8, 2]}, {"input_ids": [1, 9, 2]}])
    assert batch["labels"].tolist() == [[-100, 7, 8, -100], [-100, 9, -100, -100]]


class _ToyT5:
    def prepare_decoder_input_ids_from_labels(self, labels):
        shifted = labels.new_zeros(labels.shape)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, 0)


@pytest.mark.parametrize("multiple", [None, 8])
def test_seq2seq_matches_transformers(multiple):
    tok = make_tokenizer()
    feats = _features(with_labels=False)
    rng = random.Random(1)
    for f in feats:
        f["labels"] = [rng.randint(5, 20) for _ in range(rng.randint(1, 9))]
    model = _ToyT5()
    ours = DataCollatorForSeq2Seq(tok, model=model, pad_to_multiple_of=multiple)(feats)
    theirs = transformers.DataCollatorForSeq2Seq(tok, model=model, pad_to_multiple_of=multiple)(feats)
    _assert_same(ours, dict(theirs))
    assert "decoder_input_ids" in ours


def test_seq2seq_with_real_t5_helper():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=40, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, decoder_start_token_id=0))
    feats = [{"input_ids": [5, 6, 7], "labels": [8, 9]}, {"input_ids": [5], "labels": [8, 9, 10, 11]}]
    ours = DataCollatorForSeq2Seq(pad_token_id=0, model=t5)(feats)
    assert ours["labels"].tolist() == [[8, 9, -100, -100], [8, 9, 10, 11]]
    assert ours["decoder_input_ids"].tolist() == [[0, 8, 9, 0], [0, 8, 9, 10]]


def test_default_collator_matches_transformers():
    feats = [{"x": np.arange(3, dtype=np.float32) + i, "label": i % 2, "mask": [1, 1, 0]} for i in range(4)]
    _assert_same(default_data_collator(feats), transformers.default_data_collator(feats))
    float_labels = [{"x": [1.0], "label": 0.5}, {"x": [2.0], "label": 1.5}]
    _assert_same(default_data_collator(float_labels), transformers.default_data_collator(float_labels))
    pix = [{"pixel_values": torch.randn(3, 4, 4), "labels": 1} for _ in range(2)]
    assert default_data_collator(pix)["pixel_values"].shape == (2, 3, 4, 4)


def test_string_column_error_names_column():
    feats = [{"input_ids": [1, 2], "text": "hello"}, {"input_ids": [3, 4], "text": "bye"}]
    for coll in (default_data_collator, DataCollatorWithPadding(pad_token_id=0)):
        with pytest.raises(CollateError, match="'text'.*text"):
            coll(feats)


def test_ragged_without_padding_collator_suggests_padding():
    feats = [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}]
    with pytest.raises(CollateError, match="'input_ids'.*DataCollatorWithPadding"):
        default_data_collator(feats)


def test_transformers_collator_accepted_by_plain_call():
    tok = make_tokenizer()
    feats = _features()
    batch = transformers.DataCollatorWithPadding(tok)(feats)  # what the loader will call
    assert batch["input_ids"].shape[0] == len(feats)
