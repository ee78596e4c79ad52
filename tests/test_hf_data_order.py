"""Same script, same seed: functrain visits shuffled examples in transformers.Trainer's order, so a
multi-epoch run ends with HF's params (the reference is transformers.Trainer itself)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import functrain  # noqa: E402
from functrain.data.sampler import epoch_permutation  # noqa: E402


def _tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _rows(n=24, length=12):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (n, length), generator=g)
    # The first label is -100 so that HF's token count (it counts unshifted labels for GPT-2, whose
    # loss_type is None) equals the shifted count the loss uses: the comparison then isolates the
    # data order from that (T-1)/T normalization difference (see docs/benchmarks.md).
    return [{"input_ids": r.tolist(), "labels": [-100] + r[1:].tolist()} for r in ids]


def _global_relative_difference(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def _train(trainer_cls, args_cls, model, rows, tmp_path, **extra):
    args = args_cls(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=5e-3,
                    lr_scheduler_type="constant", save_strategy="no", report_to="none", seed=11,
                    logging_strategy="no", disable_tqdm=True, **extra)
    trainer = trainer_cls(model=model, args=args, train_dataset=rows)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("data_seed", [None, 3])
def test_shuffled_multi_epoch_run_equals_transformers_trainer(tmp_path, data_seed):
    model, rows = _tiny_gpt2(), _rows()
    ours = _train(functrain.Trainer, functrain.TrainingArguments, copy.deepcopy(model), rows, tmp_path / "ft",
                  data_seed=data_seed)
    theirs = _train(transformers.Trainer, transformers.TrainingArguments, copy.deepcopy(model), rows,
                    tmp_path / "hf", data_seed=data_seed)
    diff = _global_relative_difference(ours, theirs)
    assert diff < 2e-5, diff
    if data_seed is None:  # the order matters at this size: another data order ends elsewhere
        other = _train(functrain.Trainer, functrain.TrainingArguments, copy.deepcopy(model), rows, tmp_path / "o",
                       data_seed=99)
        assert _global_relative_difference(other, theirs) > 1e-3


def test_epoch_order_is_accelerates_seedable_sampler_order():
    from accelerate.data_loader import SeedableRandomSampler

    sampler = SeedableRandomSampler(range(50), data_seed=7)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert list(sampler) == epoch_permutation(50, seed=7, epoch=epoch).tolist()


@pytest.mark.parametrize("n", [24, 17, 5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_shares_are_accelerates_batch_sampler_shards(n, drop_last):
    """Each rank's examples, in order, are what accelerate's BatchSamplerShard hands that process
    in HF's Trainer (per-device batches dealt round-robin, tail wrapped to whole rounds)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from functrain.data.sampler import shard_indices

    order = epoch_permutation(n, seed=2, epoch=0)
    world, block = 2, 3
    for rank in range(world):
        hf = BatchSamplerShard(BatchSampler(order.tolist(), block, drop_last), num_processes=world,
                               process_index=rank, even_batches=True)
        expected = [i for batch in hf for i in batch]
        assert shard_indices(order, world, rank, drop_last, block=block).tolist() == expected
