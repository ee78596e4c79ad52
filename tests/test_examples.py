"""Each script in examples/ run with tiny settings, asserting on what it produced (metrics, files,
printed output), not only that it exited."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import functrain as ft

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (examples/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- hand_loop.py: the research-style loop over make_train_step / make_eval_step ------------------


@pytest.mark.slow
def test_hand_loop_learns_the_counting_language(capsys):
    hand_loop = load_example("hand_loop")
    out = hand_loop.main(["--steps", "30", "--batch-size", "8", "--seq-len", "16", "--lr", "5e-3", "--log-every", "10"])
    losses = [loss for _, loss in out["logged"]]
    assert [step for step, _ in out["logged"]] == [1, 10, 20, 30]
    assert int(out["state"].step) == 30
    assert losses[0] > 0.8 * math.log(hand_loop.VOCAB)  # starts near chance
    assert losses[-1] < 0.5 * losses[0]
    assert out["eval_loss"] < 0.5 * math.log(hand_loop.VOCAB)
    assert f"eval loss {out['eval_loss']:.4f}" in capsys.readouterr().out


def test_unit_test_of_a_step_in_three_lines():
    """The design notes' sketch: build a state, call the step twice on the same batch, compare."""
    hand_loop = load_example("hand_loop")
    model = hand_loop.make_model(seq_len=8)
    tx = hand_loop.make_optimizer(lr=1e-2, total_steps=10, warmup=1)
    train_step = ft.make_train_step(model, tx)
    batch = hand_loop.make_batch(torch.Generator().manual_seed(0), batch_size=4, seq_len=8)

    state = ft.TrainState.create(model, tx, seed=0, copy=True)
    before = {k: v.clone() for k, v in state.params.items()}
    s1, m1 = train_step(state, batch)
    s2, m2 = train_step(state, batch)

    # Pure: the same inputs give bitwise the same outputs (params, optimizer state, step, rng key,
    # metrics), and the input state is untouched.
    assert ft.tree.tensors_equal((s1, m1), (s2, m2))
    assert ft.tree.tensors_equal(state.params, before)
    assert not ft.tree.tensors_equal(s1.params, before)
    assert int(s1.step) == 1 and int(state.step) == 0
    # And it is a training step: the loss on that batch went down.
    _, m3 = train_step(s1, batch)
    assert float(m3["loss"]) < float(m1["loss"])


# -- lm_demo.py / `functrain demo`: end to end, then rerun to resume ------------------------------


def _run_script(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_lm_demo_end_to_end_then_resumes_without_retraining(tmp_path):
    from PIL import Image
    from transformers import AutoModelForCausalLM

    from functrain.demo import DemoConfig

    out = tmp_path / "demo"
    max_steps = DemoConfig.quick(str(out)).max_steps
    first = _run_script(["-m", "functrain", "demo", "--quick", "--output-dir", str(out)], cwd=tmp_path)

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == 256 and type(model).__name__ == "GPT2LMHeadModel"
    with Image.open(out / "curves.png") as img:
        img.verify()
    with Image.open(out / "curves.png") as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "learning_rate" in r for r in rows)
    assert any("eval_loss" in r for r in rows)
    last_ckpt = out / f"checkpoint-{max_steps}"
    assert (last_ckpt / "train_state.safetensors").is_file()
    assert json.loads((last_ckpt / "trainer_state.json").read_text())["global_step"] == max_steps
    assert "sample:" in first.stdout and first.stdout.split("sample:")[1].strip().splitlines()[1].startswith("def ")
    assert "Resuming" not in first.stdout

    weights_written = (last_ckpt / "model.safetensors").stat().st_mtime_ns
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    second = _run_script([str(EXAMPLES / "lm_demo.py"), "--quick", "--output-dir", str(out)], cwd=tmp_path)
    assert "Resuming from the newest checkpoint" in second.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == checkpoints  # no new checkpoint
    assert (last_ckpt / "model.safetensors").stat().st_mtime_ns == weights_written  # not retrained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == max_steps
    assert "sample:" in second.stdout


# -- text_classification.py: local JSON via datasets, tokenizer trained locally, tiny BERT --------


def test_shipped_sentiment_data_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_sentiment", EXAMPLES / "data" / "make_sentiment.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    shipped = [json.loads(line) for line in (EXAMPLES / "data" / "sentiment.jsonl").read_text().splitlines()]
    assert shipped == gen.make_rows()
    negated = [r for r in shipped if " not " in r["text"]]
    assert 0.25 < len(negated) / len(shipped) < 0.45  # enough "not" that word counting is not enough


@pytest.mark.slow
def test_text_classification_beats_chance_and_reloads(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ex = load_example("text_classification")
    out = ex.main(["--quick", "--output-dir", str(tmp_path)])
    trainer, metrics = out["trainer"], out["metrics"]
    labels = trainer.eval_dataset["label"]
    majority = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    assert metrics["eval_accuracy"] > max(0.7, majority + 0.1), metrics
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert [h["epoch"] for h in evals][:4] == [1.0, 2.0, 3.0, 4.0]  # evaluated each epoch
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]

    # What save_model wrote loads with from_pretrained and predicts what the trained model predicts.
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["the movie was not very good", "the food was awful", "our trip was not boring"]
    enc = tok(texts, padding=True, return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, trainer.model(**enc).logits, atol=1e-6)


# -- image_classification.py: sklearn digits, with_transform, remove_unused_columns=False ---------


@pytest.mark.slow
def test_image_classification_well_above_chance(tmp_path):
    ex = load_example("image_classification")
    out = ex.main(["--quick", "--output-dir", str(tmp_path)])
    assert out["metrics"]["eval_accuracy"] > 0.4, out["metrics"]  # chance is 0.1
    assert out["trainer"].args.remove_unused_columns is False
    # The transform built pixel_values from the raw image column (still there: nothing was dropped).
    batch = out["trainer"].train_dataset[:2]
    assert batch["pixel_values"].shape == (2, 1, 8, 8) and set(batch) == {"pixel_values", "labels"}
    assert out["trainer"].train_dataset.column_names == ["image", "label"]


# -- custom_loss.py: the class-weighted loss is what gets optimized --------------------------------


def test_custom_loss_trainer_logs_and_evaluates_the_weighted_loss(tmp_path):
    ex = load_example("custom_loss")
    data = ex.imbalanced_data(1024)
    torch.manual_seed(0)
    initial = ex.MLPClassifier()
    with torch.no_grad():
        logits = initial(data["features"])["logits"]
    weighted = float(ex.weighted_cross_entropy(logits, data["labels"]))
    plain = float(torch.nn.functional.cross_entropy(logits, data["labels"]))
    assert abs(weighted - plain) > 0.05  # the two losses are distinguishable here

    # One window holding the whole dataset: the first logged loss is the loss of the initial model on it.
    trainer = ex.train_with_trainer(str(tmp_path), steps=3, batch_size=1024)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(weighted, rel=1e-5)
    # Evaluation runs the override too: eval_loss is the mean of the per-batch weighted losses
    # (each batch weighted by its number of examples), as the HF Trainer averages eval losses.
    eval_data = ex.imbalanced_data(256, seed=1)
    bs = trainer.args.per_device_eval_batch_size
    with torch.no_grad():
        logits = trainer.model(eval_data["features"])["logits"]
    per_batch = [ex.weighted_cross_entropy(logits[i:i + bs], eval_data["labels"][i:i + bs]) * len(logits[i:i + bs])
                 for i in range(0, len(logits), bs)]
    metrics = trainer.evaluate(ex.as_dataset(eval_data))
    assert metrics["eval_loss"] == pytest.approx(float(sum(per_batch) / len(logits)), rel=1e-5)
    plain = float(torch.nn.functional.cross_entropy(logits, eval_data["labels"]))
    assert abs(metrics["eval_loss"] - plain) > 0.02


def test_custom_loss_fn_gradient_is_the_weighted_losss():
    ex = load_example("custom_loss")
    lr = 0.1
    model, state, losses = ex.train_by_hand(steps=1, batch_size=64, tx=ft.optim.sgd(lr))
    batch = {k: v[:64] for k, v in ex.imbalanced_data(64).items()}
    # model still holds the initial parameters (the state was created with copy=True)
    loss = ex.weighted_cross_entropy(model(batch["features"])["logits"], batch["labels"])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert losses[0] == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(state.params[name], p.detach() - lr * g, rtol=1e-5, atol=1e-7)
    # An SGD step on the unweighted loss would have landed elsewhere.
    plain = torch.nn.functional.cross_entropy(model(batch["features"])["logits"], batch["labels"])
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    assert not torch.allclose(grads[-1], plain_grads[-1], atol=1e-3)


def test_custom_loss_script_runs(tmp_path, capsys):
    ex = load_example("custom_loss")
    out = ex.main(["--quick", "--output-dir", str(tmp_path)])
    assert out["trainer_losses"][-1] < out["trainer_losses"][0]
    assert out["hand_losses"][-1] < out["hand_losses"][0]
    assert "hand loop + loss_fn" in capsys.readouterr().out


# -- seq2seq.py: Seq2SeqTrainer with predict_with_generate -----------------------------------------


@pytest.mark.slow
def test_seq2seq_generates_and_scores(tmp_path):
    ex = load_example("seq2seq")
    out = ex.main(["--quick", "--output-dir", str(tmp_path)])
    metrics, trainer = out["metrics"], out["trainer"]
    assert {"eval_loss", "eval_exact_match", "eval_char_accuracy"} <= set(metrics)
    evals = [h for h in trainer.state.log_history if "eval_char_accuracy" in h]
    assert len(evals) >= 3 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert metrics["eval_char_accuracy"] > 0.2, metrics  # chance per character is about 0.1 (HF: 0.34 here)
    # predict_with_generate: predictions are generated token ids, not logits.
    pred = trainer.predict(trainer.eval_dataset.select(range(4)))
    # (Padded like transformers' Seq2SeqTrainer: to the generation config's max_length.)
    vocab = trainer.model.config.vocab_size
    assert pred.predictions.ndim == 2 and pred.predictions.dtype.kind == "i"
    assert pred.predictions.min() >= 0 and pred.predictions.max() < vocab
