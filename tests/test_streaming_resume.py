"""Streaming (iterable) datasets resume in O(1) from their own state, bitwise like an
uninterrupted run: the loader, the Trainer (workers 0 and 2, gradient accumulation) and the runner."""

import json
import os

import datasets
import pytest
import torch

import functrain as ft
from functrain.data import ResumableLoader
from functrain.io import checkpoint as ck
from functrain.runner import Checkpoint, StopWhen
from functrain.trainer.args import TrainingArguments
from functrain.trainer.trainer import Trainer

from _streams import CountingStream, hf_stream, stream_rows
from _trainer_fixtures import make_model, params_of
from test_trainer import StopAt
from tests.step_models import MLP
from tests.test_runner import one_thread  # noqa: F401  (autouse: one intra-op thread)


def _stream(kind, n=40):
    rows = stream_rows(n)
    return hf_stream(rows) if kind == "hf" else CountingStream(rows)


def _ids(batches):
    return [b["x"][:, 0].tolist() for b in batches]


# -- the loader -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,workers", [("hf", 0), ("hf", 2), ("torch", 0), ("torch", 2)])
def test_loader_state_resumes_the_stream_exactly(kind, workers):
    ds = _stream(kind)

    def make():
        return ResumableLoader(ds, 3, seed=1, num_workers=workers)

    full = _ids(make())
    first = make()
    it = iter(first)
    head = _ids(next(it) for _ in range(5))
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds: JSON
    assert saved["batch_index"] == 5 and saved["stream"]["loader"]
    second = make()
    second.load_state_dict(saved)
    it = iter(second)
    again = json.loads(json.dumps(second.state_dict()))  # saved again before every worker yielded
    sixth = _ids([next(it)])
    assert head + sixth + _ids(it) == full
    assert second.state_dict() == {"epoch": 1, "batch_index": 0, "seed": 1, "stream": {}}
    third = make()
    third.load_state_dict(again)
    assert _ids(third) == full[5:]
    # Without the stream's state: read up to the position, the same batches (workers included).
    assert _ids(make().iter_from(0, 5)) == full[5:]


def test_resume_does_not_read_the_examples_before_the_position():
    ds = CountingStream(stream_rows(100))
    first = ResumableLoader(ds, 4, seed=1)
    it = iter(first)
    for _ in range(15):
        next(it)
    saved = first.state_dict()
    ds.reads = 0
    second = ResumableLoader(ds, 4, seed=1)
    second.load_state_dict(saved)
    rest = _ids(second)
    assert len(rest) == 10 and ds.reads == 40  # the 60 examples before the position: never made
    ds.reads = 0  # without the stream's state (an older checkpoint): exact, by reading up to it
    assert _ids(ResumableLoader(ds, 4, seed=1).iter_from(0, 15)) == rest and ds.reads == 100


def test_a_datasets_stream_resumes_from_its_shard():
    made = []

    def gen(shards):
        for s in shards:
            for i in range(10):
                made.append((s, i))
                yield {"x": [float(s * 10 + i)], "labels": 0}

    ds = datasets.IterableDataset.from_generator(gen, gen_kwargs={"shards": list(range(20))}).with_format("torch")
    first = ResumableLoader(ds, 4, shuffle=False)
    it = iter(first)
    for _ in range(32):  # 128 examples: shard 12, example 8
        next(it)
    saved, made[:] = first.state_dict(), []
    second = ResumableLoader(ds, 4, shuffle=False)
    second.load_state_dict(saved)
    rest = _ids(second)
    assert rest[0] == [128.0, 129.0, 130.0, 131.0] and len(rest) == 18
    # datasets skips the 12 shards before the position unread and re-reads 8 examples of shard 12.
    assert made[0] == (12, 0) and len(made) == 72 + 8


def test_a_shuffle_buffer_resumes_exactly_by_reading():
    ds = hf_stream(stream_rows(40)).shuffle(seed=3, buffer_size=16)
    first = ResumableLoader(ds, 3, seed=1)
    full = _ids(ResumableLoader(ds, 3, seed=1))
    it = iter(first)
    head = _ids(next(it) for _ in range(4))
    second = ResumableLoader(ds, 3, seed=1)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + _ids(second) == full  # datasets' state omits the buffer: the loader reads instead


def test_two_ranks_take_their_own_streams():
    for kind in ("hf", "torch"):
        ds = _stream(kind, n=48)
        ranks = [ResumableLoader(ds, 4, shuffle=False, world_size=2, rank=r, shard_block=2) for r in range(2)]
        seen = [sorted(sum(_ids(lo), [])) for lo in ranks]
        assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 48
        if kind == "torch":  # accelerate's IterableDatasetShard order: blocks of 2 dealt round-robin
            rows = stream_rows(48)
            assert _ids(ranks[1])[0] == [rows[i]["x"][0].item() for i in (2, 3, 6, 7)]


# -- the Trainer ----------------------------------------------------------------------------------


def _trainer(out, ds, workers, callbacks=None):
    # Windows of 3 x 2 = 6 of 40 examples: 7 steps an epoch, so 10 steps cross an epoch's end.
    args = TrainingArguments(str(out), per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=10,
                             learning_rate=5e-2, warmup_steps=2, logging_steps=2, save_strategy="steps",
                             save_steps=1, report_to="none", disable_tqdm=True, seed=7,
                             dataloader_num_workers=workers)
    return Trainer(model=make_model(), args=args, train_dataset=ds, callbacks=callbacks)


_REFERENCES = {}


def _reference(tmp_path_factory, kind, workers):
    if (kind, workers) not in _REFERENCES:
        ds = _stream(kind)
        t = _trainer(tmp_path_factory.mktemp("ref"), ds, workers)
        t.train()
        _REFERENCES[kind, workers] = (params_of(t), t.state.log_history, getattr(ds, "reads", None))
    return _REFERENCES[kind, workers]


@pytest.mark.parametrize("kind,workers,k", [("hf", 0, 4), ("hf", 2, 8), ("torch", 0, 8), ("torch", 2, 4)])
def test_trainer_streaming_resume_is_bitwise_and_o1(tmp_path_factory, tmp_path, kind, workers, k):
    ref_params, ref_logs, ref_reads = _reference(tmp_path_factory, kind, workers)
    ds = _stream(kind)
    assert _trainer(tmp_path, ds, workers, callbacks=[StopAt(k)]).train().global_step == k
    position = json.load(open(os.path.join(tmp_path, f"checkpoint-{k}", "trainer_state.json")))["data_position"]
    assert position["batch_index"] > 0 and len(position["streams"]) == 1  # one rank's own stream, mid-pass
    reads_before = getattr(ds, "reads", None)
    second = _trainer(tmp_path, ds, workers)
    assert second.train(resume_from_checkpoint=True).global_step == 10
    got = params_of(second)
    assert all(torch.equal(got[n], ref_params[n]) for n in ref_params)
    assert [h["loss"] for h in second.state.log_history if "loss" in h] == [h["loss"] for h in ref_logs if "loss" in h]
    if kind == "torch" and workers == 0:
        # The resumed run made only its remaining windows (and the 4 examples every train() peeks
        # at to check the first batch), not the 6k + 4 examples before the position.
        peek = ref_reads - 58  # the reference made 40 + 3 x 6 examples for its 10 windows
        assert ds.reads - reads_before == (10 - k) * 6 + peek and peek == 4


# -- the runner -----------------------------------------------------------------------------------


def _runner_setup():
    torch.manual_seed(0)
    model = MLP(d_in=8, hidden=16, classes=3, dropout=0.1)
    tx = ft.optim.adamw(ft.schedules.warmup_cosine(peak=1e-2, warmup=2, total=20))
    state = ft.TrainState.create(model, tx, seed=0, copy=True)
    state = state.replace(params=ft.tree.map(lambda p: p + 0.01, state.params))
    return ft.make_train_step(model, tx, accumulate=2), state


def test_runner_streaming_resume_is_bitwise(tmp_path):
    ds = _stream("torch")
    step, state = _runner_setup()
    ref = ft.run(step, state, ResumableLoader(ds, 4, seed=3), steps=14).state  # 10 batches an epoch
    ref_reads = ds.reads
    ds.reads = 0
    step, state = _runner_setup()
    out = ft.run(step, state, ResumableLoader(ds, 4, seed=3), steps=14,
                 hooks=[Checkpoint(tmp_path, every=3), StopWhen(lambda r: r.step == 7)])
    assert out.step == 7
    saved = ck.find_resumable_checkpoint(str(tmp_path))
    assert json.load(open(os.path.join(saved, "trainer_state.json")))["data_position"]["streams"][0]["loader"]
    step, state = _runner_setup()
    out = ft.run(step, state, ResumableLoader(ds, 4, seed=3), steps=14, hooks=[Checkpoint(tmp_path, every=3)])
    assert out.step == 14 and ft.tree.tensors_equal(out.state, ref)
    assert ds.reads == ref_reads  # 28 read before the stop, 28 after: none read twice


# -- two ranks ------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_two_ranks_resume_their_own_streams_bitwise(tmp_path):
    import subprocess
    import sys

    from test_distributed import LAUNCH_TIMEOUT, _env, free_port

    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_stream_dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           worker, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.load(open(tmp_path / f"result-{r}.json")) for r in range(2)]
    for res in results:
        assert res["world_size"] == 2
        for case in ("runner_hf", "runner_torch", "trainer"):
            assert res[case]["equal"], case  # each rank: the resumed state is the uninterrupted one, bitwise
            assert len(res[case]["position"]["streams"]) == 2, case  # each rank's own stream position
        # (a datasets stream split by node: each rank at the same place of its own shards)
        streams = res["runner_torch"]["position"]["streams"]
        assert streams[0] != streams[1]  # a torch stream dealt in blocks: each rank at its last block
    for res in results:  # the torch stream: the resumed run read only its remaining examples
        ref, first, second = res["runner_torch"]["reads"]
        assert first + second == ref, (first, second, ref)
