"""Trainer-level tests of fields no other test sets: neftune_noise_alpha, eval_on_start,
activation_checkpointing_kwargs (transformers 5's name for gradient_checkpointing_kwargs)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from functrain import Trainer, TrainingArguments  # noqa: E402


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _rows(n=8, length=10):
    ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def _train(tmp_path, **kw):
    base = dict(per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, save_strategy="no",
                report_to="none", disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=_gpt2(), args=TrainingArguments(str(tmp_path), **{**base, **kw}),
                      train_dataset=_rows(), eval_dataset=_rows(4))
    trainer.train()
    return trainer, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_neftune_noise_changes_training_deterministically_and_is_removed_after(tmp_path):
    plain_trainer, plain = _train(tmp_path / "plain")
    noisy_trainer, noisy = _train(tmp_path / "noisy", neftune_noise_alpha=5.0)
    _, again = _train(tmp_path / "again", neftune_noise_alpha=5.0)
    assert any(not torch.equal(noisy[k], plain[k]) for k in plain)  # the noise reached the gradients
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)  # drawn from the state's key: repeatable
    # After train() the hook is gone: the embeddings of a training-mode forward are the plain lookup.
    model = noisy_trainer.model.train()
    ids = torch.tensor([_rows(1)[0]["input_ids"]])
    emb = model.get_input_embeddings()
    assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, emb.weight))
    # Evaluation never adds noise: the same params evaluate to the same loss with and without the field.
    plain_trainer.model.load_state_dict(noisy)
    assert noisy_trainer.evaluate()["eval_loss"] == pytest.approx(plain_trainer.evaluate()["eval_loss"], rel=1e-6)


def test_eval_on_start_evaluates_before_the_first_step(tmp_path):
    trainer, _ = _train(tmp_path, eval_on_start=True, eval_strategy="steps", eval_steps=2)
    evals = [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    assert [s for s, _ in evals][:2] == [0, 2]
    untrained = Trainer(model=_gpt2(), args=TrainingArguments(str(tmp_path / "u"), report_to="none"),
                        eval_dataset=_rows(4)).evaluate()["eval_loss"]
    assert evals[0][1] == pytest.approx(untrained, rel=1e-6)  # the step-0 evaluation saw the initial weights


def test_activation_checkpointing_kwargs_reach_the_model(tmp_path):
    args = TrainingArguments(str(tmp_path), activation_checkpointing=True,
                             activation_checkpointing_kwargs={"use_reentrant": False}, report_to="none")
    assert args.gradient_checkpointing is True and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    _, ckpt = _train(tmp_path / "c", activation_checkpointing=True,
                     activation_checkpointing_kwargs={"use_reentrant": False})
    _, plain = _train(tmp_path / "p")
    assert all(torch.equal(ckpt[k], plain[k]) for k in plain)  # recomputation does not change the math
    with pytest.raises(Exception, match="reentrant"):
        _train(tmp_path / "r", activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
