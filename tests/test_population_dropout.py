"""Per-member dropout (a tensor hyperparameter in each member's state) and the errors that name
the member and the cause of what cannot vary inside one vmapped graph."""

import dataclasses

import pytest
import torch
from torch import nn

from functrain import Trainer, TrainingArguments, tree
from functrain.step import population as P
from functrain.trainer.population import PopulationTrainer
from tests._trainer_fixtures import TinyClassifier, make_dataset


def test_tensor_dropout_draws_each_members_own_probability_under_vmap():
    d = P.Dropout(0.3).train()
    x = torch.ones(20000)
    ps = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    torch.manual_seed(0)
    out = torch.func.vmap(lambda p: torch.func.functional_call(d, {"p": p}, (x,)), randomness="different")(ps)
    for row, p in zip(out, ps.tolist()):
        zeroed = float((row == 0).float().mean())
        assert zeroed == pytest.approx(p, abs=0.015), p
        kept = row[row != 0]
        if p < 1:
            assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p))), p  # nn.Dropout's scaling
    assert torch.equal(out[0], x) and torch.equal(out[-1], torch.zeros_like(x))
    assert torch.equal(d.eval()(x), x)
    model = P.use_tensor_dropout(TinyClassifier(p=0.2))
    assert P.dropout_buffers(model) == ["net.2.p"] and not P.float_dropouts(model)


def _args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4, learning_rate=5e-2,
                warmup_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(str(tmp_path), **base)


def _trainer(args, model_init):
    return Trainer(args=args, model_init=model_init, train_dataset=make_dataset(40))


def test_per_member_dropout_equals_trainer_runs_with_torch_dropout(tmp_path):
    args = _args(tmp_path)
    members = [{"dropout": 0.0, "seed": 1}, {"dropout": 1.0, "seed": 2}, {"dropout": 0.5, "seed": 3}, {"seed": 4}]
    pop = PopulationTrainer(_trainer(args, lambda: P.use_tensor_dropout(TinyClassifier(p=0.3))), members)
    pop.train()
    assert pop.state.buffers["net.2.p"].tolist() == pytest.approx([0.0, 1.0, 0.5, 0.3])
    states = pop.member_states()
    # p=0 and p=1 are deterministic: the members equal Trainer runs of the model with torch's nn.Dropout(p).
    for i, p in ((0, 0.0), (1, 1.0)):
        ref = _trainer(dataclasses.replace(args, seed=members[i]["seed"]), lambda p=p: TinyClassifier(p=p))
        ref.train()
        diff = tree.relative_difference(states[i].params, ref.train_state.params)
        assert diff < 1e-6, (i, diff)
    # Under p=1 the first layer gets no gradient (and weight decay is 0): it keeps its initial values.
    for i, moved in ((0, True), (1, False)):
        torch.manual_seed(members[i]["seed"])
        init = TinyClassifier(p=0.0)
        assert torch.equal(states[i].params["net.0.weight"], init.net[0].weight) is not moved, i


def test_dropout_held_as_python_floats_is_refused_naming_the_member(tmp_path):
    with pytest.raises(P.PopulationError, match=r"member 1 sets dropout=0.1, but TinyClassifier holds its dropout "
                                                r"probabilities as Python floats \(\{'net.2': 0.2\}\).*use_tensor_dropout"):
        PopulationTrainer(_trainer(_args(tmp_path), lambda: TinyClassifier(p=0.2)), [{}, {"dropout": 0.1}])
    with pytest.raises(ValueError, match=r"member 0: dropout must be a probability in \[0, 1\], got 1.5"):
        PopulationTrainer(_trainer(_args(tmp_path), lambda: TinyClassifier(p=0.2)), [{"dropout": 1.5}])


class ReadsItem(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x, labels=None):
        logits = self.fc(x)
        temperature = logits.abs().mean().item()  # a host read: one graph cannot hold N values
        return {"loss": nn.functional.cross_entropy(logits / temperature, labels), "logits": logits}


def test_vmap_errors_name_the_members_the_line_and_the_cause(tmp_path):
    pop = PopulationTrainer(_trainer(_args(tmp_path, gradient_accumulation_steps=1), ReadsItem), 3)
    with pytest.raises(P.PopulationError, match=r"ReadsItem cannot be trained as a vmapped population: `\.item\(\)` "
                                                r"reads a member's value on the host \(data-dependent\) at "
                                                r"test_population_dropout\.py:\d+ in forward: `temperature = logits\.abs\(\)\.mean\(\)"
                                                r"\.item\(\).*`, in the step of members 0\.\.2"):
        pop.train()

    def width_from_seed():  # a shape drawn from the member's seed: members cannot share one graph
        return TinyClassifier(hidden=int(torch.randint(8, 64, ())), p=0.0)

    pop = PopulationTrainer(_trainer(_args(tmp_path), width_from_seed), [{"seed": 1}, {"seed": 2}])
    with pytest.raises(P.PopulationError, match=r"params\.net\.0\.\w+.* in member 1.*\(member 1 is \{'seed': 2\}, "
                                                r"member 0 is \{'seed': 1\}: model_init built models of different shapes"):
        pop.train()
