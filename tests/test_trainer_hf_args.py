"""TrainingArguments fields through the Trainer: each field's effect, against transformers.Trainer where it has numbers."""

import logging

import pytest
import torch
from torch import nn

from _trainer_fixtures import make_dataset, make_model
from functrain import Trainer, TrainingArguments
from functrain.trainer.args import TrainingArgumentsError


def _args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=4, max_steps=4, save_strategy="no", report_to="none",
                logging_steps=1, learning_rate=1e-2, disable_tqdm=True)
    return TrainingArguments(str(tmp_path / "out"), **{**base, **kw})


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rel_diff(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (num / den) ** 0.5


# -- against transformers.Trainer ------------------------------------------------------------------


def _hf_run(tmp_path, dataset, **kw):
    import transformers

    model = make_model(p=0.0)
    model.config = transformers.PretrainedConfig()  # transformers.Trainer reads model.config
    args = transformers.TrainingArguments(str(tmp_path / "hf"), use_cpu=True, report_to="none", save_strategy="no",
                                          disable_tqdm=True, **kw)
    transformers.Trainer(model=model, args=args, train_dataset=dataset).train()
    return _params(model)


@pytest.mark.parametrize("fields", [
    pytest.param(dict(label_smoothing_factor=0.1, optim="adamw_torch", weight_decay=0.01), id="label_smoothing"),
    pytest.param(dict(optim="adafactor", weight_decay=0.1), id="adafactor"),
    pytest.param(dict(optim="adamw_torch", lr_scheduler_type="cosine_warmup_with_min_lr", warmup_steps=2,
                      lr_scheduler_kwargs={"min_lr_rate": 0.1}), id="cosine_warmup_with_min_lr"),
])
def test_fields_give_transformers_trainer_numbers(tmp_path, fields):
    # One window is the whole dataset, so the shuffled order cannot change the numbers.
    dataset = make_dataset(n=8)
    common = dict(per_device_train_batch_size=8, max_steps=5, learning_rate=1e-2, logging_steps=1, **fields)
    expected = _hf_run(tmp_path, dataset, **common)
    trainer = Trainer(make_model(p=0.0), TrainingArguments(str(tmp_path / "ft"), report_to="none",
                                                           save_strategy="no", disable_tqdm=True, **common),
                      train_dataset=dataset)
    trainer.train()
    start = _params(make_model(p=0.0))
    assert _rel_diff(_params(trainer.model), start) > 1e-3  # it trained
    assert _rel_diff(_params(trainer.model), expected) < 2e-6


def test_label_smoothing_changes_the_eval_loss_as_transformers(tmp_path):
    dataset = make_dataset(n=8)
    trainer = Trainer(make_model(p=0.0), _args(tmp_path, label_smoothing_factor=0.2, per_device_eval_batch_size=8),
                      eval_dataset=dataset)
    model = make_model(p=0.0)
    batch = trainer.data_collator([{"x": d["x"], "labels": d["labels"]} for d in dataset])
    logits = model(batch["x"])["logits"]
    expected = nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=0.2)  # same rule for 1-d labels
    assert trainer.evaluate()["eval_loss"] == pytest.approx(float(expected), rel=1e-6)


# -- accelerate launch settings through the Trainer --------------------------------------------------


def test_accelerate_mixed_precision_bf16_is_the_bf16_run(tmp_path, monkeypatch):
    dataset = make_dataset(n=16)

    def run(name, **kw):
        trainer = Trainer(make_model(), _args(tmp_path / name, **kw), train_dataset=dataset)
        trainer.train()
        return trainer

    explicit = run("explicit", bf16=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    launched = run("launched")
    assert launched.args.bf16
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    fp32 = run("fp32")
    a, b = _params(explicit.model), _params(launched.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rel_diff(_params(fp32.model), a) > 0  # bf16 really was on


# -- batch size, sampling, loaders -----------------------------------------------------------------


class _OomAbove(nn.Module):
    """A classifier that raises the CUDA out-of-memory message for batches above ``limit`` rows."""

    def __init__(self, limit):
        super().__init__()
        self.inner, self.limit, self.seen = make_model(p=0.0), limit, []

    def forward(self, x, labels=None):
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x, labels)


def test_auto_find_batch_size_shrinks_like_accelerate_and_trains_as_that_batch_size(tmp_path):
    dataset = make_dataset(n=20)
    model = _OomAbove(limit=5)
    trainer = Trainer(model, _args(tmp_path / "auto", per_device_train_batch_size=8, auto_find_batch_size=True),
                      train_dataset=dataset)
    trainer.train()
    assert model.seen[:4] == [8, 7, 6, 5]  # accelerate's rule: int(0.9 * batch_size) after each OOM
    assert trainer.args.per_device_train_batch_size == 5 and trainer.state.train_batch_size == 5
    direct = Trainer(_OomAbove(limit=5), _args(tmp_path / "direct", per_device_train_batch_size=5),
                     train_dataset=dataset)
    direct.train()
    a, b = _params(trainer.model), _params(direct.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RuntimeError, match="out of memory"):  # without the flag the error surfaces
        Trainer(_OomAbove(limit=5), _args(tmp_path / "off", per_device_train_batch_size=8),
                train_dataset=dataset).train()


class _TokenModel(nn.Module):
    """A bag-of-embeddings classifier over ``input_ids`` that records each batch's padded width."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(50, 8), nn.Linear(8, 2)
        self.widths = []

    def forward(self, input_ids, attention_mask=None, labels=None):
        self.widths.append(input_ids.shape[1])
        logits = self.head(self.emb(input_ids).mean(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _token_dataset(n=32):
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(2, 30, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(1, 50, (k,), generator=g).tolist(), "labels": i % 2, "length": k}
            for i, k in enumerate(lengths)]


def _pad(examples):
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([e["labels"] for e in examples])}


@pytest.mark.parametrize("fields, length_column", [
    ({"train_sampling_strategy": "group_by_length"}, False),  # lengths measured from input_ids
    ({"group_by_length": True}, True),  # the transformers 4.x name
    # A column that ranks examples in reverse: the order must follow the column, not input_ids.
    ({"train_sampling_strategy": "group_by_length", "length_column_name": "n_tokens"}, True),
])
def test_group_by_length_batches_examples_of_similar_length(tmp_path, fields, length_column):
    column = fields.get("length_column_name", "length")
    inverted = column == "n_tokens"

    def length_of(e):
        return 100 - e["length"] if inverted else e["length"]

    dataset = [{"input_ids": e["input_ids"], "labels": e["labels"], **({column: length_of(e)} if length_column else {})}
               for e in _token_dataset()]
    per_step = {}
    for name, extra in (("random", {}), ("grouped", fields)):
        model = _TokenModel()
        Trainer(model, _args(tmp_path / name, max_steps=8, remove_unused_columns=False, **extra),
                data_collator=_pad, train_dataset=dataset).train()
        per_step[name] = model.widths
    lengths = sorted(len(e["input_ids"]) for e in dataset)
    # transformers puts the longest batch (by the length column) first: with the reversed column, the shortest.
    assert per_step["grouped"][0] == (lengths[3] if inverted else lengths[-1])
    assert sum(per_step["grouped"]) < 0.8 * sum(per_step["random"])  # much less padding


def test_sequential_sampling_keeps_dataset_order(tmp_path):
    dataset = [{"x": torch.full((8,), float(i)), "labels": i % 3} for i in range(12)]
    seen = []

    class Record(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_model(p=0.0)

        def forward(self, x, labels=None):
            seen.extend(x[:, 0].tolist())
            return self.inner(x, labels)

    Trainer(Record(), _args(tmp_path, max_steps=3, train_sampling_strategy="sequential"), train_dataset=dataset).train()
    assert seen == [float(i) for i in range(12)]


def test_dataloader_worker_options_reach_the_loader_and_keep_results(tmp_path):
    dataset = make_dataset(n=16)
    opts = dict(dataloader_num_workers=1, dataloader_prefetch_factor=3, dataloader_persistent_workers=True,
                dataloader_multiprocessing_context="spawn", dataloader_in_order=True, dataloader_pin_memory=True)
    workers = Trainer(make_model(), _args(tmp_path / "w", **opts), train_dataset=dataset)
    loader = workers.get_train_dataloader()
    torch_loader = loader._map_loader(0, 0)
    assert (torch_loader.num_workers, torch_loader.prefetch_factor, torch_loader.persistent_workers) == (1, 3, True)
    assert torch_loader.multiprocessing_context.get_start_method() == "spawn"
    assert torch_loader.pin_memory is (workers.args.device.type != "cpu")  # pinning serves accelerator copies only
    workers.train()
    inline = Trainer(make_model(), _args(tmp_path / "i"), train_dataset=dataset)
    inline.train()
    a, b = _params(workers.model), _params(inline.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- logging -----------------------------------------------------------------------------------------


class _InfOnFlag(nn.Module):
    """Cross-entropy plus +inf when the batch holds a flagged row; the gradient stays finite."""

    def __init__(self):
        super().__init__()
        self.inner = make_model(p=0.0)

    def forward(self, x, flag, labels=None):
        out = self.inner(x, labels)
        if labels is not None:
            bad = flag.bool().any()
            out["loss"] = out["loss"] + torch.where(bad, torch.tensor(float("inf")), torch.tensor(0.0))
        return out


def _flagged(n=12, bad_step=2, batch=4):
    data = make_dataset(n=n)
    return [{"x": d["x"], "labels": d["labels"], "flag": int(i // batch == bad_step)} for i, d in enumerate(data)]


def test_logging_nan_inf_filter_replaces_a_bad_loss_by_the_running_mean(tmp_path):
    clean = Trainer(_InfOnFlag(), _args(tmp_path / "c", max_steps=3, train_sampling_strategy="sequential"),
                    train_dataset=[{**d, "flag": 0} for d in _flagged()])
    clean.train()
    l1, l2 = (h["loss"] for h in clean.state.log_history[:2])
    logged = {}
    for on in (True, False):
        t = Trainer(_InfOnFlag(), _args(tmp_path / str(on), max_steps=3, logging_steps=3, logging_nan_inf_filter=on,
                                        train_sampling_strategy="sequential"), train_dataset=_flagged())
        out = t.train()
        logged[on] = (t.state.log_history[0]["loss"], out.training_loss)
    expected = (l1 + l2 + (l1 + l2) / 3) / 3  # transformers: tr_loss += tr_loss / (1 + steps since the last log)
    assert logged[True][0] == pytest.approx(expected, rel=1e-6)
    assert logged[True][1] == pytest.approx(expected, rel=1e-6)
    assert logged[False][0] == float("inf")


def test_log_levels_set_the_functrain_logger(tmp_path):
    log = logging.getLogger("functrain")
    before = log.level
    try:
        Trainer(make_model(), _args(tmp_path, log_level="error"))
        assert log.level == logging.ERROR
        Trainer(make_model(), _args(tmp_path, log_level="debug"))
        assert log.level == logging.DEBUG
    finally:
        log.setLevel(before)


def test_memory_metrics_and_tokens_per_second(tmp_path):
    dataset = _token_dataset(16)
    kw = dict(remove_unused_columns=False, per_device_eval_batch_size=8)
    on = Trainer(_TokenModel(), _args(tmp_path / "on", skip_memory_metrics=False, include_tokens_per_second=True, **kw),
                 data_collator=_pad, train_dataset=dataset, eval_dataset=dataset)
    train = on.train().metrics
    for key in ("init_mem_cpu_alloc_delta", "init_mem_cpu_peaked_delta", "train_mem_cpu_alloc_delta",
                "train_mem_cpu_peaked_delta", "before_init_mem_cpu"):
        assert isinstance(train[key], int), key
    assert train["train_mem_cpu_peaked_delta"] >= 0 and train["before_init_mem_cpu"] > 0
    tokens = sum(w * 4 for w in on.model.widths)  # padded input_ids numel of the 4 windows
    assert train["train_tokens_per_second"] == pytest.approx(tokens / train["train_runtime"], rel=1e-2)
    assert {"eval_mem_cpu_alloc_delta", "eval_mem_cpu_peaked_delta"} <= set(on.evaluate())
    assert {"test_mem_cpu_alloc_delta", "test_mem_cpu_peaked_delta"} <= set(on.predict(dataset).metrics)
    off = Trainer(_TokenModel(), _args(tmp_path / "off", **kw), data_collator=_pad, train_dataset=dataset,
                  eval_dataset=dataset)
    metrics = {**off.train().metrics, **off.evaluate()}
    assert not [k for k in metrics if "_mem_" in k or "tokens_per_second" in k]


# -- evaluation, precision and compilation -----------------------------------------------------------


@pytest.mark.parametrize("field, dtype", [("bf16_full_eval", torch.bfloat16), ("fp16_full_eval", torch.float16)])
def test_full_eval_evaluates_in_that_dtype(tmp_path, field, dtype):
    dataset = _token_dataset(16)
    trainer = Trainer(_TokenModel(), _args(tmp_path, remove_unused_columns=False, per_device_eval_batch_size=16,
                                           **{field: True}), data_collator=_pad, eval_dataset=dataset)
    reference = _TokenModel().to(dtype)  # what transformers does: the model cast to the dtype
    with torch.no_grad():
        expected = float(reference(**_pad(dataset))["loss"])
    fp32 = float(_TokenModel()(**_pad(dataset))["loss"])
    got = trainer.evaluate()["eval_loss"]
    assert got == pytest.approx(expected, rel=1e-6)
    assert got != fp32


def test_eval_accumulation_steps_keeps_predictions(tmp_path):
    dataset = make_dataset(n=10)
    outs = [Trainer(make_model(), _args(tmp_path / str(n), per_device_eval_batch_size=3, eval_accumulation_steps=n))
            .predict(dataset) for n in (None, 1, 2)]
    for out in outs[1:]:
        assert (out.predictions == outs[0].predictions).all() and (out.label_ids == outs[0].label_ids).all()


def test_torch_compile_backend_and_mode_reach_torch_compile(tmp_path):
    from torch._dynamo import register_backend

    calls = []

    @register_backend(name="functrain_test_counting")
    def counting(gm, example_inputs):
        calls.append(len(example_inputs))
        return gm.forward

    dataset = make_dataset(n=8)
    compiled = Trainer(make_model(p=0.0), _args(tmp_path / "c", max_steps=2,
                                                torch_compile_backend="functrain_test_counting"),
                       train_dataset=dataset)
    assert compiled.args.torch_compile
    compiled.train()
    assert calls  # the step went through the named backend
    eager = Trainer(make_model(p=0.0), _args(tmp_path / "e", max_steps=2), train_dataset=dataset)
    eager.train()
    assert _rel_diff(_params(compiled.model), _params(eager.model)) < 1e-6
    from functrain.trainer.arg_effects import compile_kwargs

    assert compile_kwargs(_args(tmp_path, torch_compile_mode="max-autotune")) == {"backend": "inductor",
                                                                               "mode": "max-autotune"}
    with pytest.raises(TrainingArgumentsError, match="torch_compile_mode='no_such_mode'"):
        _args(tmp_path / "m", torch_compile_mode="no_such_mode")


# -- devices, checkpoints, misc ----------------------------------------------------------------------


def test_use_cpu_trains_on_the_cpu(tmp_path):
    trainer = Trainer(make_model(), _args(tmp_path, use_cpu=True), train_dataset=make_dataset())
    trainer.train()
    assert trainer.args.device == torch.device("cpu") and trainer.args.n_gpu == 0
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())
    assert trainer.train_state.step.device.type == "cpu"


class _ArgsOnMeta(TrainingArguments):
    """Arguments whose device is not the CPU (a stand-in for cuda:N on a machine without GPUs)."""

    @property
    def device(self):
        return torch.device("meta")


def test_the_model_is_placed_on_args_device(tmp_path):
    """As transformers' Trainer: the model moves to ``args.device`` at start-up (and after model_init)."""
    args = _ArgsOnMeta(str(tmp_path), report_to="none", save_strategy="no")
    assert all(p.is_meta for p in Trainer(make_model(), args).model.parameters())
    assert all(p.is_meta for p in Trainer(model_init=make_model, args=args).model.parameters())
    spread = make_model()
    spread.hf_device_map = {"a": "cpu", "b": "disk"}  # spread over devices by from_pretrained: left alone
    assert all(p.device.type == "cpu" for p in Trainer(spread, args).model.parameters())


def test_use_cpu_reaches_the_process_group_set_up(monkeypatch):
    """use_cpu=True on a GPU machine: accelerate's PartialState is asked for the CPU (gloo), and nccl
    is refused with the reason."""
    import accelerate

    from functrain.parallel import distributed as fd

    asked = {}

    class Recorder:
        def __init__(self, **kw):
            asked.update(kw)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the check sees
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(accelerate, "PartialState", Recorder)
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    fd.init_distributed(cpu=True)
    assert asked["cpu"] is True and asked["backend"] is None
    fd.init_distributed()
    assert asked["cpu"] is False
    with pytest.raises(fd.DistributedLaunchError, match="CPU was asked for"):
        fd.init_distributed("nccl", cpu=True)


def test_resume_from_checkpoint_field_as_scripts_use_it(tmp_path):
    dataset = make_dataset(n=16)
    full = Trainer(make_model(), _args(tmp_path / "full", max_steps=4), train_dataset=dataset)
    full.train()
    first = Trainer(make_model(), _args(tmp_path / "part", max_steps=4, save_strategy="steps", save_steps=2),
                    train_dataset=dataset)
    first.train()
    args = _args(tmp_path / "part", max_steps=4, resume_from_checkpoint=str(tmp_path / "part" / "out" / "checkpoint-2"))
    resumed = Trainer(make_model(seed=5), args, train_dataset=dataset)
    resumed.train(resume_from_checkpoint=args.resume_from_checkpoint)  # as transformers' example scripts do
    a, b = _params(full.model), _params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_activation_checkpointing_is_gradient_checkpointing(tmp_path):
    with pytest.raises(ValueError, match="gradient_checkpointing=True but the model has no gradient_checkpointing_enable"):
        Trainer(make_model(), _args(tmp_path, activation_checkpointing=True))
