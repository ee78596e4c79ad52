"""The seeds' common patterns through ``functrain.Trainer`` and ``transformers.Trainer`` on the same
tiny model, seed and data: classification, token classification, question answering
(start/end positions: label names from the forward signature), seq2seq, causal and masked LM, with
transformers' own collators. Every step is one full batch (the data order cannot differ), so final
parameters must agree within 2e-5 global relative difference, and eval losses / predictions too."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from _tiny_tokenizer import make_tokenizer  # noqa: E402
import functrain  # noqa: E402

ROWS, VOCAB, TOL = 8, 32, 2e-5
COMMON = dict(per_device_train_batch_size=ROWS, per_device_eval_batch_size=ROWS, num_train_epochs=4,
              learning_rate=3e-3, warmup_steps=1, weight_decay=0.01, save_strategy="no", report_to="none",
              disable_tqdm=True, seed=0, logging_steps=1,
              # Some parameters have a gradient that is zero up to rounding (attention key biases, the
              # QA head's bias: softmax ignores a constant shift). Adam with eps=1e-8 turns that
              # rounding noise into full-size steps, which no two implementations share; a larger eps
              # keeps those updates at noise size and every real gradient unaffected.
              adam_epsilon=1e-5)


def _bert(head, **cfg):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, **cfg)
    return getattr(transformers, head)(config)


def _ids(rng, n, lo=5, hi=9):
    return [rng.integers(5, VOCAB, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


class SequentialHFTrainer(transformers.Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class SequentialTrainer(functrain.Trainer):
    """Batches from a plain torch DataLoader (a subclass's get_train_dataloader may return any iterable)."""

    def get_train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_dataset, batch_size=ROWS, collate_fn=self.data_collator)


def _run_both(tmp_path, make_model, train, evaluation=None, make_collator=lambda: None, sequential=False, **extra):
    """``sequential``: rows in dataset order on both sides (a random collator's masks depend on it)."""
    results = {}
    classes = {"hf": SequentialHFTrainer if sequential else transformers.Trainer,
               "ft": SequentialTrainer if sequential else functrain.Trainer}
    for name, lib in (("hf", transformers), ("ft", functrain)):
        args = lib.TrainingArguments(str(tmp_path / name), **{**COMMON, **extra})
        trainer = classes[name](make_model(), args, train_dataset=train, eval_dataset=evaluation,
                                data_collator=make_collator())
        trainer.train()
        predicted = trainer.predict(evaluation) if evaluation is not None else None
        params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        results[name] = (params, predicted)
    (hf_params, hf_pred), (ft_params, ft_pred) = results["hf"], results["ft"]
    rel = float((ft_params - hf_params).norm() / hf_params.norm())
    start = torch.cat([p.detach().flatten() for p in make_model().parameters()])
    assert float((hf_params - start).norm() / start.norm()) > 100 * TOL  # the runs really trained
    print(f"global relative difference to transformers.Trainer: {rel:.2e}")  # shown with pytest -s
    assert rel < TOL, f"final params differ from transformers.Trainer: global relative difference {rel:.2e}"
    return hf_pred, ft_pred


def _same_predictions(hf_pred, ft_pred):
    assert ft_pred.metrics["test_loss"] == pytest.approx(hf_pred.metrics["test_loss"], rel=1e-5)
    hp, fp = hf_pred.predictions, ft_pred.predictions
    assert type(fp) is type(hp)
    for a, b in zip(hp if isinstance(hp, tuple) else (hp,), fp if isinstance(fp, tuple) else (fp,)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    hl, fl = hf_pred.label_ids, ft_pred.label_ids
    assert type(fl) is type(hl)
    for a, b in zip(hl if isinstance(hl, tuple) else (hl,), fl if isinstance(fl, tuple) else (fl,)):
        np.testing.assert_array_equal(b, a)


def test_sequence_classification(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"input_ids": ids, "label": int(rng.integers(3))} for ids in _ids(rng, ROWS, 6, 7)]
    hf_pred, ft_pred = _run_both(tmp_path, lambda: _bert("BertForSequenceClassification", num_labels=3), rows, rows)
    _same_predictions(hf_pred, ft_pred)


def test_token_classification_with_hf_collator(tmp_path):
    rng = np.random.default_rng(1)
    rows = [{"input_ids": ids, "labels": rng.integers(4, size=len(ids)).tolist()} for ids in _ids(rng, ROWS)]
    hf_pred, ft_pred = _run_both(tmp_path, lambda: _bert("BertForTokenClassification", num_labels=4), rows, rows,
                                 lambda: transformers.DataCollatorForTokenClassification(make_tokenizer()))
    _same_predictions(hf_pred, ft_pred)


def test_question_answering_start_end_positions(tmp_path):
    """No 'labels' key: the label names come from BertForQuestionAnswering's forward signature
    (start_positions, end_positions); label_ids is a tuple of both, as in transformers."""
    rng = np.random.default_rng(2)
    rows = []
    for ids in _ids(rng, ROWS, 8, 9):
        start = int(rng.integers(0, 6))
        rows.append({"input_ids": ids, "start_positions": start, "end_positions": start + int(rng.integers(0, 3))})
    hf_pred, ft_pred = _run_both(tmp_path, lambda: _bert("BertForQuestionAnswering"), rows, rows)
    assert isinstance(ft_pred.label_ids, tuple) and len(ft_pred.label_ids) == 2
    assert isinstance(ft_pred.predictions, tuple) and len(ft_pred.predictions) == 2  # start and end logits
    _same_predictions(hf_pred, ft_pred)


def test_question_answering_with_explicit_label_names(tmp_path):
    rng = np.random.default_rng(3)
    rows = [{"input_ids": ids, "start_positions": 1, "end_positions": 3} for ids in _ids(rng, ROWS, 8, 9)]
    _run_both(tmp_path, lambda: _bert("BertForQuestionAnswering"), rows,
              label_names=["start_positions", "end_positions"])


def test_causal_lm_with_hf_collator(tmp_path):
    """A ``...ForCausalLM`` model: transformers counts the loss's items over labels[..., 1:] for it, as
    functrain does. (For GPT2LMHeadModel, whose loss_type transformers 5 cannot infer, transformers
    counts the unshifted labels, scaling its loss by shifted/unshifted tokens; functrain keeps the
    true mean. README, "Coming from transformers".)"""
    rng = np.random.default_rng(4)
    rows = [{"input_ids": ids} for ids in _ids(rng, ROWS)]

    def llama():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2))

    _run_both(tmp_path, llama, rows,
              make_collator=lambda: transformers.DataCollatorForLanguageModeling(make_tokenizer(), mlm=False))


def test_masked_lm_with_hf_collator(tmp_path):
    rng = np.random.default_rng(5)
    rows = [{"input_ids": ids} for ids in _ids(rng, ROWS)]
    _run_both(tmp_path, lambda: _bert("BertForMaskedLM"), rows, sequential=True, make_collator=lambda: (
        transformers.DataCollatorForLanguageModeling(make_tokenizer(), mlm_probability=0.3, seed=0)))


def test_seq2seq_with_hf_collator(tmp_path):
    rng = np.random.default_rng(6)
    tok = make_tokenizer()

    def t5():
        torch.manual_seed(0)
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=3))

    rows = [{"input_ids": src, "labels": tgt} for src, tgt in zip(_ids(rng, ROWS), _ids(rng, ROWS, 3, 6))]
    _run_both(tmp_path, t5, rows, make_collator=lambda: transformers.DataCollatorForSeq2Seq(tok, model=t5()))
