import pytest
import torch
import transformers

from functrain.data.collators import DataCollatorForSeq2Seq
from functrain.data.loader import ResumableLoader
from functrain.trainer.evaluation import evaluation_loop
from functrain.trainer.generation import generate_predictions, generation_kwargs_from_args, make_generate_eval_step


def _t5(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=48, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1,
                                num_heads=2, d_kv=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _batch(model):
    feats = [{"input_ids": [5, 6, 7, 8, 1], "labels": [9, 10, 1]}, {"input_ids": [11, 12, 1], "labels": [13, 1]}]
    return DataCollatorForSeq2Seq(pad_token_id=0, model=model)(feats)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_state_params_equals_direct_generate(num_beams):
    model = _t5()
    other = _t5(seed=1)  # the state's weights differ from the module's own
    state = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    batch = _batch(model)
    kwargs = generation_kwargs_from_args(generation_max_length=12, generation_num_beams=num_beams)
    ours = generate_predictions(model, state, batch, kwargs)
    with torch.no_grad():
        direct = other.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                max_length=12, num_beams=num_beams)
    assert ours.shape == (2, 12)
    assert torch.equal(ours[:, : direct.shape[1]], direct)
    assert (ours[:, direct.shape[1]:] == 0).all()
    # the module's own parameters are untouched
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _t5().parameters()))
    assert not torch.equal(ours, generate_predictions(model, dict(model.named_parameters()), batch, kwargs))


def test_generation_config_and_train_state():
    import functrain
    from functrain.core.optim import sgd

    model = _t5()
    state = functrain.TrainState.create(model, sgd(0.1))
    config = transformers.GenerationConfig(max_new_tokens=5, num_beams=2, decoder_start_token_id=0,
                                           pad_token_id=0, eos_token_id=1)
    batch = _batch(model)
    ours = generate_predictions(model, state, batch, {"generation_config": config})
    with torch.no_grad():
        direct = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                generation_config=config)
    assert torch.equal(ours, direct)


def test_predict_with_generate_through_evaluation_loop():
    model = _t5()
    state = dict(model.named_parameters())
    feats = [{"input_ids": list(range(5, 5 + n)) + [1], "labels": list(range(20, 20 + n)) + [1]} for n in (1, 4, 2, 6, 3)]
    loader = ResumableLoader(feats, batch_size=2, shuffle=False, collate_fn=DataCollatorForSeq2Seq(pad_token_id=0, model=model))

    def eval_step(state, batch):
        with torch.no_grad():
            out = torch.func.functional_call(model, state, (), dict(batch))
        return {"loss": out.loss, "num_items": (batch["labels"] != -100).sum()}

    step = make_generate_eval_step(model, eval_step, {"max_length": 7})
    out = evaluation_loop(step, state, loader, compute_metrics=lambda p: {"n": float(p.predictions.shape[0])},
                          metric_key_prefix="test")
    assert out.predictions.shape == (5, 7) and out.metrics["test_n"] == 5.0
    for i, b in enumerate(loader.iter_from(0)):
        with torch.no_grad():
            direct = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_length=7)
        assert torch.equal(torch.from_numpy(out.predictions[2 * i: 2 * i + len(direct), : direct.shape[1]]), direct)
    assert "test_loss" in out.metrics
