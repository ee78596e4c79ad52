import ctypes
import gc
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from functrain.data.collators import DataCollatorForLanguageModeling
from functrain.data.loader import ResumableLoader
from functrain.trainer.evaluation import EvalPrediction, evaluation_loop, pad_and_concatenate
from functrain.core.metrics import Accuracy


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=64, width=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return {"logits": self.head(self.emb(input_ids))}


def make_eval_step(model, return_outputs=True):
    """A stand-in for functrain.step.make_eval_step: token-level loss over labels != -100."""

    def eval_step(state, batch):
        with torch.no_grad():
            out = torch.func.functional_call(model, state, (batch["input_ids"],))
            labels = batch["labels"]
            num_items = (labels != -100).sum()
            loss = F.cross_entropy(out["logits"].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="sum") / num_items.clamp_min(1)
        result = {"loss": loss, "num_items": num_items}
        if return_outputs:
            result["outputs"] = out
        return result

    return eval_step


def _data(n, vocab=64, seed=0, min_len=1, max_len=13):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(min_len, max_len))]
        rows.append({"input_ids": ids})
    return rows


def _setup(n=10, batch_size=4, vocab=64):
    torch.manual_seed(0)
    model = TinyLM(vocab)
    state = dict(model.named_parameters())
    rows = _data(n, vocab)
    loader = ResumableLoader(rows, batch_size=batch_size, shuffle=False,
                             collate_fn=DataCollatorForLanguageModeling(pad_token_id=0))
    return model, state, rows, loader


def test_eval_loss_is_token_weighted_mean_over_whole_set():
    model, state, rows, loader = _setup(n=10, batch_size=4)  # batches of 4, 4, 2; uneven padding
    out = evaluation_loop(make_eval_step(model), state, loader)
    with torch.no_grad():
        per_token = torch.cat([F.cross_entropy(model(torch.tensor([r["input_ids"]]))["logits"][0],
                                               torch.tensor(r["input_ids"]), reduction="none") for r in rows])
    direct = per_token.mean().item()
    assert out.metrics["eval_loss"] == pytest.approx(direct, rel=1e-6)
    # the mean of per-batch means would be different here: the test would catch that bug
    batch_means = [make_eval_step(model)(state, b)["loss"].item() for b in loader.iter_from(0)]
    assert abs(np.mean(batch_means) - direct) > 1e-4
    assert out.predictions is None and out.num_samples == 10
    assert {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"} <= set(out.metrics)


def test_predictions_padded_across_batches_and_compute_metrics():
    model, state, rows, loader = _setup(n=10, batch_size=4)
    seen = {}

    def compute_metrics(eval_pred):
        predictions, label_ids = eval_pred  # tuple-unpackable like transformers.EvalPrediction
        assert eval_pred.predictions is predictions and eval_pred.label_ids is label_ids
        seen["p"], seen["l"] = predictions, label_ids
        valid = label_ids != -100
        return {"accuracy": float((predictions[valid] == label_ids[valid]).mean())}

    out = evaluation_loop(
        make_eval_step(model), state, loader, compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
        streaming_metrics=lambda batch, o: {"stream_acc": Accuracy.from_logits(o["logits"], batch["labels"])},
    )
    longest = max(len(r["input_ids"]) for r in rows)
    assert out.predictions.shape == out.label_ids.shape == (10, longest)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        with torch.no_grad():
            direct = model(torch.tensor([r["input_ids"]]))["logits"][0].argmax(-1).numpy()
        np.testing.assert_array_equal(out.predictions[i, :n], direct)
        np.testing.assert_array_equal(out.label_ids[i, :n], r["input_ids"])
        assert (out.label_ids[i, n:] == -100).all()
    # rows of a batch shorter than the longest batch are padded with -100 across batches
    assert (out.predictions[:, -1] == -100).any()
    assert out.metrics["eval_accuracy"] == pytest.approx(out.metrics["eval_stream_acc"])
    assert seen["p"] is out.predictions


def test_full_logits_kept_as_numpy_and_prefix():
    model, state, rows, loader = _setup(n=6, batch_size=4)
    out = evaluation_loop(make_eval_step(model), state, loader, collect_predictions=True, metric_key_prefix="test")
    assert isinstance(out.predictions, np.ndarray) and out.predictions.shape[:2] == out.label_ids.shape
    assert out.predictions.shape[2] == 64 and "test_loss" in out.metrics
    only_loss = evaluation_loop(make_eval_step(model), state, loader, prediction_loss_only=True,
                                compute_metrics=lambda p: {"x": 1.0})
    assert only_loss.predictions is None and "eval_x" not in only_loss.metrics


def test_eval_prediction_compatible_with_transformers_usage():
    p = EvalPrediction(np.zeros(2), np.ones(2))
    preds, labels = p
    assert (labels == 1).all() and len(p) == 2 and p[0] is p.predictions
    assert len(EvalPrediction(1, 2, inputs=3)) == 3


def test_pad_and_concatenate_nested():
    a = (np.ones((2, 3)), {"x": np.zeros((2, 1, 4))})
    b = (np.ones((1, 5)), {"x": np.zeros((1, 2, 4))})
    out = pad_and_concatenate([a, b])
    assert out[0].shape == (3, 5) and (out[0][:2, 3:] == -100).all()
    assert out[1]["x"].shape == (3, 2, 4)


def _hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def _fix_mmap_threshold():
    """Serve large blocks by mmap so freed logits go back to the OS at once; otherwise glibc's
    adaptive threshold keeps freed 32 MB blocks in the heap and the peak RSS jitters by a batch."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("not glibc")
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def _peak_during(fn) -> float:
    """Peak resident memory (MB) above the current level while ``fn`` runs (Linux peak reset)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    base = _hwm_mb()
    fn()
    return _hwm_mb() - base


@pytest.mark.slow
def test_memory_does_not_grow_with_number_of_batches():
    # 32k vocabulary, 32 tokens, batches of 8: one batch of fp32 logits is 32 MB
    vocab = 32_000
    _fix_mmap_threshold()
    torch.manual_seed(0)
    model = TinyLM(vocab, width=8)
    state = dict(model.named_parameters())
    step = make_eval_step(model)
    collate = DataCollatorForLanguageModeling(pad_token_id=0)

    def run(n, **kw):
        rows = _data(n, vocab, min_len=32, max_len=32)
        loader = ResumableLoader(rows, batch_size=8, shuffle=False, collate_fn=collate)
        return lambda: evaluation_loop(step, state, loader, **kw)

    streaming = dict(streaming_metrics=lambda b, o: {"accuracy": Accuracy.from_logits(o["logits"], b["labels"])})
    argmax = dict(compute_metrics=lambda p: {"n": float(p.predictions.size)},
                  preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1))
    full = dict(compute_metrics=lambda p: {"n": float(p.predictions.size)})
    _peak_during(run(16, **streaming))  # warm up allocator and kernels
    results = {}
    for name, kw in (("streaming", streaming), ("argmax", argmax)):
        results[name] = (_peak_during(run(40, **kw)), _peak_during(run(200, **kw)))
    # control: accumulating full logits grows by ~32 MB per batch; the measurement sees it
    results["full_logits"] = (_peak_during(run(16, **full)), _peak_during(run(48, **full)))
    print({k: tuple(round(v, 1) for v in vals) for k, vals in results.items()})
    small, large = results["full_logits"]
    assert large - small > 100  # 4 more batches of 32 MB logits, kept (the HF-style pile-up)
    for name in ("streaming", "argmax"):
        small, large = results[name]
        # 20 more batches would add 640 MB if logits were kept; allow allocator noise only
        assert large - small < 40, (name, results[name])
