"""Trainer-level: optim= names and reduce_lr_on_plateau against transformers.Trainer on the same run."""

import pytest
import torch

from functrain.trainer.args import TrainingArguments
from functrain.trainer.trainer import Trainer

from _trainer_fixtures import make_dataset, make_model

# One full-dataset batch per step: no dependence on either library's shuffling.
COMMON = dict(per_device_train_batch_size=22, per_device_eval_batch_size=22, num_train_epochs=8, learning_rate=5e-2,
              weight_decay=0.01, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=7)


def _run_both(tmp_path, **kw):
    import transformers

    args = {**COMMON, **kw}
    data = make_dataset()
    eval_data = data[:10]  # eval loss falls as training fits the data
    ours = Trainer(model=make_model(p=0.0), args=TrainingArguments(str(tmp_path / "ours"), **args),
                   train_dataset=data, eval_dataset=eval_data if "eval_strategy" in kw else None)
    ours.train()
    hf_model = make_model(p=0.0)
    theirs = transformers.Trainer(model=hf_model, args=transformers.TrainingArguments(str(tmp_path / "hf"), **args),
                                  train_dataset=data, eval_dataset=eval_data if "eval_strategy" in kw else None)
    theirs.train()
    return ours, theirs


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_rel(a, b):
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.parametrize("optim_name, optim_args", [
    ("adamw_torch", None),
    ("sgd", None),
    ("sgd", "momentum=0.9,nesterov=True"),
    ("rmsprop", None),
    ("rmsprop", "alpha=0.9,centered=True,momentum=0.5"),
    ("adagrad", "lr_decay=0.01"),
    ("schedule_free_adamw", None),
    ("schedule_free_sgd", "weight_lr_power=1.5,r=0.5"),
])
def test_optim_names_match_hf_trainer(tmp_path, optim_name, optim_args):
    ours, theirs = _run_both(tmp_path, optim=optim_name, optim_args=optim_args, learning_rate=1e-2)
    start = _params(make_model(p=0.0))
    assert _max_rel(_params(theirs.model), start) > 1e-3  # it trained
    assert _max_rel(_params(ours.model), _params(theirs.model)) <= 1e-5
    if optim_name != "adagrad":  # (ours logs Adagrad's lr_decay-ed rate; HF logs the schedule's)
        assert _logged(ours, "learning_rate") == pytest.approx(_logged(theirs, "learning_rate"), rel=1e-6)


@pytest.mark.parametrize("kwargs", [
    {"mode": "max", "patience": 0, "factor": 0.5},  # eval loss falls: every evaluation is a 'bad' one
    {"patience": 1, "factor": 0.3, "threshold": 1.0, "threshold_mode": "abs", "cooldown": 1},  # never improves
])
def test_reduce_lr_on_plateau_lr_trajectory_matches_hf_trainer(tmp_path, kwargs):
    ours, theirs = _run_both(tmp_path, optim="adamw_torch", lr_scheduler_type="reduce_lr_on_plateau",
                             lr_scheduler_kwargs=kwargs, eval_strategy="steps", eval_steps=1)
    ours_lr, hf_lr = _logged(ours, "learning_rate"), _logged(theirs, "learning_rate")
    assert len(hf_lr) == 8 and min(hf_lr) < COMMON["learning_rate"]  # the scheduler really reduced
    assert ours_lr == pytest.approx(hf_lr, rel=1e-6)
    assert _logged(ours, "eval_loss") == pytest.approx(_logged(theirs, "eval_loss"), rel=1e-5)


@pytest.mark.parametrize("targets", [["net.0"], r"net\.[03]", "all-linear"])
def test_galore_adamw_matches_hf_trainer(tmp_path, targets):
    ours, theirs = _run_both(tmp_path, optim="galore_adamw", optim_target_modules=targets, learning_rate=1e-2,
                             optim_args="rank=2,update_proj_gap=3,scale=0.5")
    assert _max_rel(_params(theirs.model), _params(make_model(p=0.0))) > 1e-3
    assert _max_rel(_params(ours.model), _params(theirs.model)) <= 1e-5
    assert _logged(ours, "learning_rate") == pytest.approx(_logged(theirs, "learning_rate"), rel=1e-6)


def test_galore_adafactor_matches_hf_trainer(tmp_path):
    ours, theirs = _run_both(tmp_path, optim="galore_adafactor", optim_target_modules=r"net\.[03]", learning_rate=1e-2,
                             optim_args="rank=2,update_proj_gap=3,scale=0.5,proj_type=reverse_std")
    assert _max_rel(_params(theirs.model), _params(make_model(p=0.0))) > 1e-3
    assert _max_rel(_params(ours.model), _params(theirs.model)) <= 1e-5
    assert _logged(ours, "learning_rate") == pytest.approx(_logged(theirs, "learning_rate"), rel=1e-6)


@pytest.mark.parametrize("name", ["galore_adamw_8bit", "galore_adafactor_layerwise", "galore_adamw_layerwise"])
def test_refused_and_incomplete_optimizer_names(tmp_path, name):
    with pytest.raises(ValueError, match="galore_adamw"):
        TrainingArguments(str(tmp_path), optim=name)
    args = TrainingArguments(str(tmp_path), optim="galore_adamw", report_to="none")
    with pytest.raises(ValueError, match="optim_target_modules"):
        Trainer(model=make_model(), args=args, train_dataset=make_dataset()).train()


def test_schedule_free_evaluates_the_averaged_params_like_hf(tmp_path):
    ours, theirs = _run_both(tmp_path, optim="schedule_free_adamw", warmup_steps=2, eval_strategy="steps",
                             eval_steps=2)
    ours_eval, hf_eval = _logged(ours, "eval_loss"), _logged(theirs, "eval_loss")
    assert len(hf_eval) == 4 and ours_eval == pytest.approx(hf_eval, rel=1e-5)
    # and x differs from y, so evaluating y instead would have been caught
    import functrain.optim as optim

    s = ours.train_state
    x = optim.schedule_free_eval_params(s.opt_state, s.params)
    assert max(float((x[k] - s.params[k]).abs().max()) for k in x) > 1e-4


def test_reduce_lr_on_plateau_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="eval_strategy"):
        TrainingArguments(str(tmp_path), lr_scheduler_type="reduce_lr_on_plateau")
    args = TrainingArguments(str(tmp_path), lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps",
                             eval_steps=1, lr_scheduler_kwargs={"verbose": True}, report_to="none")
    trainer = Trainer(model=make_model(), args=args, train_dataset=make_dataset(), eval_dataset=make_dataset())
    with pytest.raises(ValueError, match="verbose"):
        trainer.train()


@pytest.mark.slow
def test_use_liger_kernel_trains_like_the_plain_loss(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 96, (8, 16), generator=g)]
    runs = {}
    for fused in (False, True):
        args = TrainingArguments(str(tmp_path / str(fused)), use_liger_kernel=fused, per_device_train_batch_size=4,
                                 max_steps=4, learning_rate=0.5, optim="sgd", logging_steps=1, save_strategy="no",
                                 report_to="none", disable_tqdm=True)
        t = Trainer(model=model(), args=args, train_dataset=data)
        if fused:
            assert t._train_loss_fn() is not None
        t.train()
        runs[fused] = t
    assert _logged(runs[True], "loss") == pytest.approx(_logged(runs[False], "loss"), rel=1e-5)
    assert _max_rel(_params(runs[True].model), _params(runs[False].model)) <= 1e-5


def _run_both_with_class(tmp_path, cls_and_kwargs, **kw):
    import transformers

    args = {**COMMON, **kw}
    data = make_dataset()
    ours = Trainer(model=make_model(p=0.0), args=TrainingArguments(str(tmp_path / "ours"), **args),
                   train_dataset=data, optimizer_cls_and_kwargs=cls_and_kwargs)
    ours.train()
    hf_model = make_model(p=0.0)
    theirs = transformers.Trainer(model=hf_model, args=transformers.TrainingArguments(str(tmp_path / "hf"), **args),
                                  train_dataset=data, optimizer_cls_and_kwargs=cls_and_kwargs)
    theirs.train()
    return ours, theirs


@pytest.mark.parametrize("cls_name, kwargs", [
    ("AdamW", {"lr": 2e-2, "betas": (0.8, 0.95), "eps": 1e-6, "fused": False}),
    ("AdamW", {}),  # torch's default lr (1e-3) is the schedule's base, as in HF
    ("Adam", {"lr": 2e-2, "betas": (0.85, 0.99)}),  # L2 weight decay on the decay group
    ("SGD", {"lr": 5e-2, "momentum": 0.9, "nesterov": True}),
    ("RMSprop", {"lr": 1e-2, "alpha": 0.9, "centered": True}),
    ("Adagrad", {"lr": 5e-2, "initial_accumulator_value": 0.1}),
    ("AdamW", {"lr": 2e-2, "weight_decay": 0.5}),  # the groups' weight_decay (args: 0.01) wins, as in HF
])
def test_optimizer_cls_and_kwargs_matches_hf_trainer(tmp_path, cls_name, kwargs):
    ours, theirs = _run_both_with_class(tmp_path, (getattr(torch.optim, cls_name), kwargs),
                                        lr_scheduler_type="cosine", warmup_steps=2)
    assert _max_rel(_params(theirs.model), _params(make_model(p=0.0))) > 1e-4  # it trained
    assert _max_rel(_params(ours.model), _params(theirs.model)) <= 1e-5
    if cls_name != "Adagrad":
        assert _logged(ours, "learning_rate") == pytest.approx(_logged(theirs, "learning_rate"), rel=1e-6)


@pytest.mark.parametrize("value, error, match", [
    ((torch.optim.NAdam, {}), TypeError, "not a class functrain builds"),
    ((torch.optim.AdamW, {"amsgrad": True}), ValueError, "amsgrad=True"),
    ((torch.optim.AdamW, {"params": []}), ValueError, "param groups"),
    ((torch.optim.SGD, {"betas": (0.9, 0.99)}), TypeError, r"SGD got \['betas'\]"),
    (torch.optim.AdamW, TypeError, "must be a pair"),
])
def test_optimizer_cls_and_kwargs_refusals(tmp_path, value, error, match):
    with pytest.raises(error, match=match):
        Trainer(model=make_model(), args=TrainingArguments(str(tmp_path), report_to="none"),
                train_dataset=make_dataset(), optimizer_cls_and_kwargs=value)
    import functrain

    with pytest.raises(RuntimeError, match="incompatible"):
        Trainer(model=make_model(), args=TrainingArguments(str(tmp_path), report_to="none"),
                train_dataset=make_dataset(), optimizers=(functrain.optim.sgd(0.1), None),
                optimizer_cls_and_kwargs=(torch.optim.AdamW, {}))


def test_create_optimizer_without_arguments_is_the_one_train_builds(tmp_path):
    """HF's ``create_optimizer()`` takes no arguments; ours builds the optimizer (its schedule over
    the run's steps inside) that ``train()`` builds: training with it given is the same run."""
    def trainer(out, **kw):
        args = TrainingArguments(str(tmp_path / out), report_to="none", num_train_epochs=3, per_device_train_batch_size=8,
                                 lr_scheduler_type="linear", learning_rate=5e-2, save_strategy="no", seed=1)
        return Trainer(model=make_model(p=0.0), args=args, train_dataset=make_dataset(40), **kw)

    reference = trainer("ref")
    assert reference._planned_steps() == 3 * 5  # 40 rows / 8 per step, 3 epochs
    reference.train()
    given = trainer("given", optimizers=(trainer("built").create_optimizer(), None))
    given.train()
    # A given optimizer is not assumed leafwise, so it runs as the functional AdamW rather than torch's
    # fused kernel: the same update, rounded differently (measured 2e-7).
    assert _max_rel(_params(given.model), _params(reference.model)) <= 1e-6
    short = trainer("short", optimizers=(trainer("other").create_optimizer(
        trainer("other").create_scheduler(5)), None))  # another schedule: other numbers
    short.train()
    assert _max_rel(_params(short.model), _params(reference.model)) > 1e-4


def test_get_decay_parameter_names_matches_hf_and_an_override_is_used_like_hf(tmp_path):
    import transformers

    model = make_model(p=0.0)
    ours = Trainer(model=model, args=TrainingArguments(str(tmp_path / "a"), report_to="none"), train_dataset=make_dataset())
    theirs = transformers.Trainer(model=model, args=transformers.TrainingArguments(str(tmp_path / "b"), report_to="none",
                                                                                   use_cpu=True))
    assert sorted(ours.get_decay_parameter_names(model)) == sorted(theirs.get_decay_parameter_names(model))

    def only_first_layer(self, model):  # decay one layer's weight only
        return ["net.0.weight"]

    class Ours(Trainer):
        get_decay_parameter_names = only_first_layer

    class Theirs(transformers.Trainer):
        get_decay_parameter_names = only_first_layer

    args = {**COMMON, "weight_decay": 0.5, "learning_rate": 1e-2}
    data = make_dataset()
    a = Ours(model=make_model(p=0.0), args=TrainingArguments(str(tmp_path / "ours"), **args), train_dataset=data)
    a.train()
    b = Theirs(model=make_model(p=0.0), args=transformers.TrainingArguments(str(tmp_path / "hf"), **args),
               train_dataset=data)
    b.train()
    assert _max_rel(_params(a.model), _params(b.model)) <= 1e-5
    default = Trainer(model=make_model(p=0.0), args=TrainingArguments(str(tmp_path / "dflt"), **args), train_dataset=data)
    default.train()
    assert _max_rel(_params(a.model), _params(default.model)) > 1e-4  # the override changed the run
