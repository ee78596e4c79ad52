"""push_to_hub through huggingface_hub against a local HTTP endpoint (tests/_fake_hub.py) that
speaks the Hub's create-repo / preupload / commit API: which files arrive when for each
hub_strategy, one upload in flight, resume from a downloaded ``last-checkpoint/``, and failures
(HTTP 500, endpoint gone) that warn while training goes on. The real Hub is not reachable in CI.
"""

import logging
import os
import types

import pytest
import torch

from functrain.io import checkpoint as ck
from functrain.trainer.args import TrainingArguments
from functrain.trainer.callbacks import TrainerCallback
from functrain.trainer.trainer import Trainer

from _fake_hub import start_fake_hub
from _trainer_fixtures import make_dataset, make_model, params_of

pytest.importorskip("huggingface_hub")

ROOT_FILES = ["metrics.jsonl", "model.safetensors", "training_args.json"]
CKPT_FILES = ["manifest.json", "model.safetensors", "rng_state.safetensors", "train_state.safetensors",
              "trainer_state.json", "training_args.json"]


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    server = start_fake_hub()
    # What HF_ENDPOINT / HF_HUB_DISABLE_XET set when huggingface_hub is imported (read once, at
    # import). The fake Hub speaks LFS, not Xet: weights go preupload -> LFS batch -> PUT -> commit.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    yield server
    server.stop()


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub retries a failed request 5 times, sleeping 1+2+4+8+8 s; skip the sleeps."""
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=lambda s: None))


def _trainer(out, callbacks=None, **kw):
    args = dict(max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=2,
                report_to="none", disable_tqdm=True, seed=3, push_to_hub=True, hub_token="hf_test_token",
                hub_always_push=True)
    args.update(kw)
    return Trainer(model=make_model(), args=TrainingArguments(str(out), **args), train_dataset=make_dataset(),
                   callbacks=callbacks)


def _log(hub):
    return [(c.message, sorted(c.files)) for c in hub.commits]


@pytest.mark.parametrize("strategy", ["every_save", "all_checkpoints"])
def test_pushed_root_weights_are_the_checkpoints_they_were_copied_from(tmp_path, hub, strategy):
    revision = "dev" if strategy == "all_checkpoints" else None
    trainer = _trainer(tmp_path / "run", hub_strategy=strategy, hub_model_id="org/tiny", hub_revision=revision)
    trainer.train()
    step2 = hub.commits[0].files["model.safetensors"]  # the weights pushed at step 2 are checkpoint-2's
    if strategy == "all_checkpoints":
        assert hub.commits[1].files["checkpoint-2/model.safetensors"] == step2
    assert (tmp_path / "run" / "model.safetensors").read_bytes() != step2  # step 4's weights since


class _HoldUploadsUntilStep(TrainerCallback):
    """Keeps what each save wrote (checkpoint files as saved) and opens the Hub's gate only once
    step ``release`` was saved, so the uploads queued before run after later saves (and rotations)."""

    def __init__(self, hub, release):
        self.hub, self.release, self.saved = hub, release, {}

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.saved[state.global_step] = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}
        if state.global_step == self.release:
            self.hub.gate.set()


def test_a_queued_push_sends_what_was_saved_when_it_was_queued(tmp_path, hub):
    """The race seen under load, made deterministic: the Hub holds the step-2 uploads until step 4
    was saved, which replaced output_dir's weights and (save_total_limit=1) deleted checkpoint-2.
    The step-2 commits still carry checkpoint-2's bytes."""
    hub.gate.clear()
    keep = _HoldUploadsUntilStep(hub, release=4)
    trainer = _trainer(tmp_path / "run", hub_strategy="checkpoint", save_total_limit=1, callbacks=[keep])
    trainer.train()
    assert not (tmp_path / "run" / "checkpoint-2").exists()  # rotated away before its upload ran
    assert hub.commits[0].message == "Training in progress, step 2"
    assert hub.commits[0].files["model.safetensors"] == keep.saved[2]["model.safetensors"]
    assert keep.saved[2]["model.safetensors"] != keep.saved[4]["model.safetensors"]
    assert _log(hub)[:2] == [("Training in progress, step 2", ROOT_FILES),
                             ("Training in progress, step 2, checkpoint", [f"last-checkpoint/{f}" for f in CKPT_FILES])]
    assert hub.commits[1].files == {f"last-checkpoint/{f}": b for f, b in keep.saved[2].items()}
    assert hub.files("tester/run")["model.safetensors"] == keep.saved[4]["model.safetensors"]
    assert not [p for p in os.listdir(tmp_path / "run") if p.startswith("_")]  # staging folders removed


def test_large_weights_go_through_lfs_and_arrive_intact(tmp_path, hub):
    """A 3 MB model.safetensors (safetensors files are LFS on the Hub): preupload says "lfs", the
    bytes go through the LFS batch API and a PUT checked against their sha256, the commit names the
    object; the final push finds it stored already (no second PUT) and the repo holds the same bytes."""
    trainer = Trainer(model=make_model(hidden=70_000),
                      args=TrainingArguments(str(tmp_path / "run"), max_steps=2, save_steps=2,
                                             per_device_train_batch_size=4, report_to="none", disable_tqdm=True,
                                             push_to_hub=True, hub_token="hf_test_token"),
                      train_dataset=make_dataset())
    trainer.train()
    trainer.push_to_hub()
    local = (tmp_path / "run" / "model.safetensors").read_bytes()
    assert len(local) > 3_000_000 and local == (tmp_path / "run" / "checkpoint-2" / "model.safetensors").read_bytes()
    assert [c.message for c in hub.commits] == ["Training in progress, step 2", "End of training"]
    for commit in hub.commits:
        assert commit.lfs == {"model.safetensors"} and commit.files["model.safetensors"] == local
    assert list(hub.lfs_objects.values()) == [local]


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "all_checkpoints", "end"])
def test_each_hub_strategy_pushes_the_files_hf_pushes(tmp_path, hub, strategy):
    revision = "dev" if strategy == "all_checkpoints" else None
    trainer = _trainer(tmp_path / "run", hub_strategy=strategy, hub_model_id="org/tiny", hub_private_repo=True,
                       hub_revision=revision)
    repo = {"private": True, "token": "Bearer hf_test_token", **({"branches": ["dev"]} if revision else {})}
    assert hub.repos == {"org/tiny": repo}  # created at init (and the hub_revision branch)
    assert trainer.hub_model_id == "org/tiny"
    trainer.train()

    expected = []
    for step in (2, 4):
        if strategy == "end":
            break
        expected.append((f"Training in progress, step {step}", ROOT_FILES))
        folder = {"checkpoint": "last-checkpoint", "all_checkpoints": f"checkpoint-{step}"}.get(strategy)
        if folder:
            expected.append((f"Training in progress, step {step}, checkpoint", [f"{folder}/{f}" for f in CKPT_FILES]))
    assert _log(hub) == expected
    assert {c.revision for c in hub.commits} <= {revision or "main"}

    if strategy == "end":  # save_model() pushes when push_to_hub=True, as HF
        trainer.save_model()
        assert _log(hub) == [("Model save", sorted(["README.md"] + ROOT_FILES))]
    trainer.push_to_hub()  # blocking: the final model and the model card
    message, files = _log(hub)[-1]
    assert message == "End of training" and files == sorted(["README.md"] + ROOT_FILES)
    final = hub.commits[-1].files
    assert final["model.safetensors"] == (tmp_path / "run" / "model.safetensors").read_bytes()
    assert b"generated_from_trainer" in final["README.md"] and b"hf_test_token" not in final["training_args.json"]


def test_last_checkpoint_resumes_after_download(tmp_path, hub):
    """hub_strategy="checkpoint": the repo's last-checkpoint/ as it was after step 4, downloaded,
    resumes to the same parameters as the uninterrupted run."""
    full = _trainer(tmp_path / "full", max_steps=6, hub_strategy="checkpoint")
    full.train()
    after_step4 = 1 + [c.message for c in hub.commits].index("Training in progress, step 4, checkpoint")
    download = tmp_path / "download"
    for path, data in hub.files("tester/full", upto=after_step4).items():
        if path.startswith("last-checkpoint/"):
            (download / path).parent.mkdir(parents=True, exist_ok=True)
            (download / path).write_bytes(data)
    assert ck.verify_checkpoint(str(download / "last-checkpoint"))["step"] == 4

    resumed = _trainer(tmp_path / "resumed", max_steps=6, push_to_hub=False)
    resumed.train(resume_from_checkpoint=str(download / "last-checkpoint"))
    assert resumed.state.global_step == 6
    want, got = params_of(full), params_of(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)
    def losses(t):
        return [(h["step"], h["loss"], h["grad_norm"], h["learning_rate"]) for h in t.state.log_history if "loss" in h]

    assert losses(resumed) == losses(full)


class _OpenGateAtTrainEnd(TrainerCallback):
    def __init__(self, hub):
        self.hub = hub

    def on_train_end(self, args, state, control, **kwargs):
        self.hub.gate.set()


@pytest.mark.parametrize("always_push", [False, True])
def test_one_upload_in_flight_and_steps_never_wait(tmp_path, hub, caplog, always_push):
    """The Hub holds the first upload until training has ended: every step ran meanwhile.
    Without hub_always_push the saves made while it was in flight are not pushed (HF); with it they
    queue behind it, one upload at a time."""
    hub.gate.clear()
    trainer = _trainer(tmp_path / "run", max_steps=6, hub_always_push=always_push,
                       callbacks=[_OpenGateAtTrainEnd(hub)])
    with caplog.at_level(logging.INFO, logger="functrain"):
        trainer.train()
    assert trainer.state.global_step == 6
    pushed = [m for m, _ in _log(hub)]
    if always_push:
        assert pushed == [f"Training in progress, step {s}" for s in (2, 4, 6)]
    else:
        assert pushed == ["Training in progress, step 2"]
        skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not pushing")]
        assert [s.split()[2] for s in skipped] == ["checkpoint-4:", "checkpoint-6:"]
    assert hub.max_in_flight == 1


@pytest.mark.parametrize("failure", ["http_500", "endpoint_gone"])
def test_failed_upload_warns_and_training_goes_on(tmp_path, hub, no_backoff, caplog, failure):
    trainer = _trainer(tmp_path / "run", hub_strategy="checkpoint")
    if failure == "http_500":
        hub.fail_uploads = True
    else:
        hub.stop()
    with caplog.at_level(logging.WARNING, logger="functrain"):
        trainer.train()
        assert trainer.push_to_hub() is None  # a blocking push that fails warns too
    assert trainer.state.global_step == 4 and hub.commits == []
    failed = [r.getMessage() for r in caplog.records if "push to the Hub repo tester/run failed" in r.getMessage()]
    assert failed and all("Training goes on; the files stay in" in m for m in failed)
    for step in (2, 4):  # nothing local lost
        ck.verify_checkpoint(str(tmp_path / "run" / f"checkpoint-{step}"))
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "README.md").is_file()
    assert not [p for p in os.listdir(tmp_path / "run") if p.startswith("_")]  # staging folders removed


def test_repo_that_cannot_be_created_is_an_error_before_training(tmp_path, hub):
    hub.fail_create = True
    with pytest.raises(RuntimeError, match="(?s)push_to_hub=True but the Hub repo 'run' could not be created at "
                                           f"{hub.url}.*set push_to_hub=False"):
        _trainer(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_folder_files_lists_nested_files_and_never_enters_a_staging_folder(tmp_path, monkeypatch):
    from functrain.io import hub

    for rel in ("a.json", "checkpoint-2/model.safetensors", "checkpoint-2/sub/x.txt", "runs/ev.log",
                f"{hub.STAGING_PREFIX}abc/checkpoint-2/model.safetensors"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    walked = []
    real_walk = os.walk

    def recording_walk(top, *args, **kwargs):  # (test-local: records the folders the listing enters)
        for entry in real_walk(top, *args, **kwargs):
            walked.append(entry[0])
            yield entry

    monkeypatch.setattr(hub.os, "walk", recording_walk)
    files = hub.folder_files(str(tmp_path), ignore_patterns=["runs/*"])
    assert sorted(files) == ["a.json", "checkpoint-2/model.safetensors", "checkpoint-2/sub/x.txt"]
    assert files["checkpoint-2/sub/x.txt"] == str(tmp_path / "checkpoint-2" / "sub" / "x.txt")
    # a finished upload deletes its staging folder at any time: the listing must not walk into it
    assert str(tmp_path / "checkpoint-2" / "sub") in walked
    assert not any(hub.STAGING_PREFIX in w for w in walked), walked
