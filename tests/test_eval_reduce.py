"""Evaluation keeps only what its mode needs: a batch's whole logits never outlive its step (loss
only: dropped; argmax: reduced as the step returns), with results identical to the full-logits
path and to transformers.Trainer's."""

import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from functrain.trainer.evaluation import evaluation_loop


class Tracked:
    """An eval step over a linear LM head that remembers (weakly) every logits tensor it returned
    and checks, when called again, that none of them is still alive."""

    def __init__(self, vocab=50, width=8):
        torch.manual_seed(0)
        self.emb, self.head = torch.randn(vocab, width), torch.randn(width, vocab)
        self.returned = []
        self.alive_at_next_step = 0

    def __call__(self, state, batch):
        self.alive_at_next_step += sum(ref() is not None for ref in self.returned)
        logits = self.emb[batch["input_ids"]] @ self.head
        num_items = torch.tensor(batch["labels"].numel())
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        self.returned.append(weakref.ref(logits))
        return {"loss": loss, "num_items": num_items, "outputs": logits}


def _batches(n=5, rows=3, seq=4, vocab=50):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, vocab, (rows, seq), generator=g)), "labels": ids.roll(1, -1)}
            for _ in range(n)]


MODES = {
    "loss_only": dict(prediction_loss_only=True, compute_metrics=lambda p: {}),
    "no_metrics": dict(),
    "argmax": dict(compute_metrics=lambda p: {"n": float(p.predictions.size)},
                   preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1)),
    "argmax_batched": dict(compute_metrics=lambda p, compute_result: {"n": float(p.predictions.numel())},
                           preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
                           batch_eval_metrics=True),
    "streaming": dict(streaming_metrics=lambda b, o: {}),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_batch_of_logits_never_outlives_its_step(mode):
    step = Tracked()
    evaluation_loop(step, None, _batches(), **MODES[mode])
    assert len(step.returned) == 5
    assert step.alive_at_next_step == 0


def test_reduced_predictions_equal_the_full_logits_argmax():
    batches = _batches()
    full = evaluation_loop(Tracked(), None, batches, compute_metrics=lambda p: {})
    reduced = evaluation_loop(Tracked(), None, batches, compute_metrics=lambda p: {},
                              preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1))
    np.testing.assert_array_equal(reduced.predictions, full.predictions.argmax(-1))
    np.testing.assert_array_equal(reduced.label_ids, full.label_ids)
    assert reduced.metrics["eval_loss"] == full.metrics["eval_loss"]


def test_preprocess_receives_the_step_labels_and_the_logits():
    seen = []

    def preprocess(logits, labels):
        seen.append((logits.shape, labels.shape))
        return logits.argmax(-1)

    evaluation_loop(Tracked(), None, _batches(n=2), compute_metrics=lambda p: {}, preprocess_logits_for_metrics=preprocess)
    assert seen == [((3, 4, 50), (3, 4))] * 2


# -- through the Trainer, against transformers.Trainer ----------------------------------------------


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _rows(n=10, seq=12, vocab=97):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def _evaluate(kind, tmp_path, **kw):
    import datasets

    ds = datasets.Dataset.from_list(_rows())
    if kind == "hf":
        import transformers

        args = transformers.TrainingArguments(str(tmp_path / "hf"), per_device_eval_batch_size=4, report_to="none",
                                              use_cpu=True, prediction_loss_only=kw.pop("loss_only", False))
        trainer = transformers.Trainer(model=_gpt2(), args=args, eval_dataset=ds, **kw)
    else:
        from functrain.trainer.args import TrainingArguments
        from functrain.trainer.trainer import Trainer

        args = TrainingArguments(str(tmp_path / "ft"), per_device_eval_batch_size=4, report_to=[],
                                 prediction_loss_only=kw.pop("loss_only", False))
        trainer = Trainer(model=_gpt2(), args=args, eval_dataset=ds, **kw)
    return trainer


def test_trainer_argmax_and_loss_only_match_transformers(tmp_path):
    got = {}

    def keep(name):
        def compute_metrics(p):
            got[name] = (np.asarray(p.predictions), np.asarray(p.label_ids))
            return {"n": float(np.asarray(p.predictions).size)}
        return compute_metrics

    argmax = lambda logits, labels: logits.argmax(-1)  # noqa: E731
    results = {}
    for kind in ("hf", "ft"):
        results[kind, "argmax"] = _evaluate(kind, tmp_path, compute_metrics=keep(kind),
                                            preprocess_logits_for_metrics=argmax).evaluate()
        results[kind, "loss"] = _evaluate(kind, tmp_path, loss_only=True).evaluate()
    np.testing.assert_array_equal(got["ft"][0], got["hf"][0])
    np.testing.assert_array_equal(got["ft"][1], got["hf"][1])
    full = _evaluate("ft", tmp_path).predict(__import__("datasets").Dataset.from_list(_rows()))
    np.testing.assert_array_equal(got["ft"][0], full.predictions.argmax(-1))  # as from the whole logits
    # HF scales GPT-2's loss by (T-1)/T (it counts unshifted labels; docs/benchmarks.md, "Why HF's
    # eval_loss differs"); functrain's is the shifted token mean, the same in both modes.
    seq = len(_rows()[0]["input_ids"])
    for mode in ("argmax", "loss"):
        assert results["ft", mode]["eval_loss"] == pytest.approx(results["hf", mode]["eval_loss"] * seq / (seq - 1),
                                                                 rel=1e-5)
    assert results["ft", "argmax"]["eval_loss"] == results["ft", "loss"]["eval_loss"]
    assert "eval_n" not in results["ft", "loss"]
