"""Uploads to one Hugging Face Hub repo through ``huggingface_hub``, in the background.

``HfApi.upload_folder(run_as_future=True)`` queues the upload on the API object's single worker
thread, so a training step never waits on the network and uploads run one at a time.

What a queued upload sends is fixed when it is queued, not when the worker gets to it: the files
are staged into a private folder (``_hub-upload-*`` under ``staging_root``) that the upload reads
and then deletes. Files of an immutable folder (a ``checkpoint-N``: written once, later only
replaced or deleted as a whole) are hard-linked there, so a later save or a checkpoint rotation
cannot change or remove them; every other file is copied. A blocking upload reads its files
directly (nothing runs meanwhile).

A failed upload (HTTP error, endpoint gone) is logged once as a warning and never raised into
training: the files it was sending stay where they are on disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from concurrent.futures import Future
from pathlib import Path

logger = logging.getLogger("functrain")

STAGING_PREFIX = "_hub-upload-"


class HubUploader:
    """The repo ``repo_id`` on the Hub (``endpoint``: default ``HF_ENDPOINT`` / huggingface.co).

    ``staging_root``: where queued uploads stage their files; on the filesystem of the files
    uploaded (hard links), e.g. the run's ``output_dir``. Default: the system's temp folder.
    """

    def __init__(self, repo_id: str, *, token: str | None = None, revision: str | None = None,
                 endpoint: str | None = None, staging_root: str | None = None):
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=endpoint, token=token, library_name="functrain")
        self.repo_id = repo_id
        self.revision = revision
        self.staging_root = staging_root
        self.jobs: list[Future] = []

    @classmethod
    def create_repo(cls, name: str, *, token: str | None = None, private: bool | None = None,
                    revision: str | None = None, endpoint: str | None = None,
                    staging_root: str | None = None) -> "HubUploader":
        """Create (or reuse) the repo ``name``; an error here (bad token, Hub unreachable) is raised:
        it happens before training, where stopping is cheap."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token, library_name="functrain")
        try:
            url = api.create_repo(name, private=private, exist_ok=True)
            if revision is not None:  # a commit to a branch that does not exist would fail
                api.create_branch(url.repo_id, branch=revision, exist_ok=True)
        except Exception as e:
            raise RuntimeError(
                f"push_to_hub=True but the Hub repo {name!r} could not be created at {api.endpoint} "
                f"({type(e).__name__}: {e}). Check hub_token (or `hf auth login`), hub_model_id and HF_ENDPOINT, "
                "or set push_to_hub=False") from e
        if staging_root is not None:
            remove_stale_staging(staging_root)
        return cls(url.repo_id, token=token, revision=revision, endpoint=endpoint, staging_root=staging_root)

    def busy(self) -> bool:
        """An upload is queued or running."""
        return any(not job.done() for job in self.jobs)

    def upload_folder(self, folder: str, *, commit_message: str, path_in_repo: str | None = None,
                      ignore_patterns: list[str] | None = None, immutable: bool = False, blocking: bool = False):
        """Queue ``folder`` for upload (``immutable``: its files are never rewritten in place).
        ``blocking=True``: wait and return the CommitInfo, or None on failure."""
        if blocking:
            return self._queue(folder, commit_message, path_in_repo, ignore_patterns, source=folder, staged=None,
                               blocking=True)
        files = folder_files(folder, ignore_patterns)
        return self.upload_files(files, commit_message=commit_message, path_in_repo=path_in_repo,
                                 immutable=files.values() if immutable else ())

    def upload_files(self, files: Mapping[str, str], *, commit_message: str, path_in_repo: str | None = None,
                     immutable: Collection[str] = ()):
        """Queue one commit of ``files`` (path in the repo -> local file), staged now: the local
        files in ``immutable`` are hard-linked, the others copied. Returns the upload's Future."""
        source = os.path.commonpath(list(files.values())) if files else "."
        staged = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.staging_root)
        try:
            stage_files(files, immutable, staged)
        except OSError as e:  # e.g. a full disk: this push is skipped, training goes on
            shutil.rmtree(staged, ignore_errors=True)
            logger.warning("push to the Hub repo %s skipped (%r): staging its files in %s failed: %s. Training "
                           "goes on; the files stay in %s.", self.repo_id, commit_message, staged, e, source)
            return None
        return self._queue(staged, commit_message, path_in_repo, None, source=source, staged=staged, blocking=False)

    def _queue(self, folder, commit_message, path_in_repo, ignore_patterns, *, source, staged, blocking):
        if not self.busy():
            self.jobs = []
        job = self.api.upload_folder(repo_id=self.repo_id, folder_path=folder, path_in_repo=path_in_repo,
                                     commit_message=commit_message, revision=self.revision,
                                     ignore_patterns=ignore_patterns, run_as_future=True)
        job.add_done_callback(lambda f: _report_failure(f, self.repo_id, commit_message, source, staged))
        self.jobs.append(job)
        return _result_or_none(job) if blocking else job

    def wait(self) -> None:
        """Wait for every queued upload (failures were already logged)."""
        if self.busy():
            logger.info("waiting for the upload to %s to finish", self.repo_id)
        for job in self.jobs:
            _result_or_none(job)


def folder_files(folder: str, ignore_patterns: list[str] | None = None) -> dict[str, str]:
    """The files of ``folder`` an upload sends (relative POSIX path -> local path), filtered as
    ``upload_folder`` filters them; staging folders are never among them."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(folder)
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Never walk into a staging folder: it is not uploaded, and a finished upload deletes it
        # while we list (a glob over it raised FileNotFoundError).
        dirnames[:] = [d for d in dirnames if not d.startswith(STAGING_PREFIX)]
        base = Path(dirpath).relative_to(root)
        rel += [(base / f).as_posix() for f in filenames if os.path.isfile(os.path.join(dirpath, f))]
    rel.sort()
    ignore = [*(ignore_patterns or []), f"{STAGING_PREFIX}*"]
    return {r: str(root / r) for r in filter_repo_objects(rel, ignore_patterns=ignore)}


def remove_stale_staging(root: str) -> None:
    """Delete the staging folders an interrupted run left in ``root`` (their uploads are gone)."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(STAGING_PREFIX):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def stage_files(files: Mapping[str, str], immutable: Collection[str], into: str) -> str:
    """Lay ``files`` out under ``into`` (``{path in repo: local file}``): a hard link for an
    immutable file (no bytes copied; it outlives the original's replacement or deletion), a copy
    otherwise (or where a link is impossible, e.g. across filesystems)."""
    immutable = set(immutable)
    for rel, src in files.items():
        dst = os.path.join(into, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if src in immutable:
            try:
                os.link(src, dst)
                continue
            except OSError:
                pass
        shutil.copyfile(src, dst)
    return into


def _result_or_none(job: Future):
    try:
        return job.result()
    except Exception:  # reported by _report_failure
        return None


def _report_failure(job: Future, repo_id: str, commit_message: str, source: str, staged: str | None) -> None:
    if staged is not None:
        shutil.rmtree(staged, ignore_errors=True)
    exc = job.exception()
    if exc is not None:
        logger.warning("push to the Hub repo %s failed (%r): %s: %s. Training goes on; the files stay in %s and "
                       "the next push sends them again.", repo_id, commit_message, type(exc).__name__, exc, source)
