"""Uploads to one Hugging Face Hub repo through ``huggingface_hub``, in the background.

``HfApi.upload_folder(run_as_future=True)`` queues the upload on the API object's single worker
thread, so a training step never waits on the network and uploads run one at a time. A failed
upload (HTTP error, endpoint gone) is logged once as a warning and never raised into training:
the files it was sending stay where they are on disk.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

logger = logging.getLogger("functrain")


class HubUploader:
    """The repo ``repo_id`` on the Hub (``endpoint``: default ``HF_ENDPOINT`` / huggingface.co)."""

    def __init__(self, repo_id: str, *, token: str | None = None, revision: str | None = None,
                 endpoint: str | None = None):
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=endpoint, token=token, library_name="functrain")
        self.repo_id = repo_id
        self.revision = revision
        self.jobs: list[Future] = []

    @classmethod
    def create_repo(cls, name: str, *, token: str | None = None, private: bool | None = None,
                    revision: str | None = None, endpoint: str | None = None) -> "HubUploader":
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
        return cls(url.repo_id, token=token, revision=revision, endpoint=endpoint)

    def busy(self) -> bool:
        """An upload is queued or running."""
        return any(not job.done() for job in self.jobs)

    def upload_folder(self, folder: str, *, commit_message: str, path_in_repo: str | None = None,
                      ignore_patterns: list[str] | None = None, blocking: bool = False):
        """Queue ``folder`` for upload (``blocking=True``: wait and return the CommitInfo, or None
        on failure)."""
        if not any(not job.done() for job in self.jobs):
            self.jobs = []
        job = self.api.upload_folder(repo_id=self.repo_id, folder_path=folder, path_in_repo=path_in_repo,
                                     commit_message=commit_message, revision=self.revision,
                                     ignore_patterns=ignore_patterns, run_as_future=True)
        job.add_done_callback(lambda f: _report_failure(f, self.repo_id, folder, commit_message))
        self.jobs.append(job)
        if blocking:
            return _result_or_none(job)
        return job

    def wait(self) -> None:
        """Wait for every queued upload (failures were already logged)."""
        if self.busy():
            logger.info("waiting for the upload to %s to finish", self.repo_id)
        for job in self.jobs:
            _result_or_none(job)


def _result_or_none(job: Future):
    try:
        return job.result()
    except Exception:  # reported by _report_failure
        return None


def _report_failure(job: Future, repo_id: str, folder: str, commit_message: str) -> None:
    exc = job.exception()
    if exc is not None:
        logger.warning("push to the Hub repo %s failed (%r, from %s): %s: %s. Training goes on; the files stay "
                       "in %s and the next push sends them again.", repo_id, commit_message, folder,
                       type(exc).__name__, exc, folder)
