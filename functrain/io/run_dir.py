"""One training run per ``output_dir``: a lock, and the rule for checkpoints other runs left there.

The lock is an ``fcntl.flock`` on ``output_dir/_functrain.lock`` holding the owner's pid and host.
The kernel drops a ``flock`` when its process dies, so a lock left by a killed run never blocks;
a live one makes a second Trainer refuse, naming the holder.

The checkpoint rule (stricter than transformers, which mixes runs silently; loud either way):

* a new run (or a resume from a folder outside ``output_dir``) next to ``checkpoint-N`` folders of
  another run is refused with an error naming them; ``overwrite_output_dir=True`` deletes them,
  with a warning;
* a resume from an older checkpoint of ``output_dir`` supersedes the newer ones: they are renamed
  ``checkpoint-N.superseded-*`` with a warning (deleted with ``overwrite_output_dir=True``);
* newer folders that fail verification, or hold NaN/Inf a resume skipped, are renamed
  ``checkpoint-N.broken-*`` with a warning.

Otherwise rotation (which deletes by step number) would delete this run's fresh checkpoints and
``resume_from_checkpoint=True`` would pick the other run's.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import uuid

from functrain.io import checkpoint as ck

try:
    import fcntl
except ImportError:  # not POSIX: no lock, said once when training starts
    fcntl = None

logger = logging.getLogger("functrain")

LOCK_FILE = "_functrain.lock"  # "_*": never uploaded to the Hub (as transformers)


class OutputDirLock:
    """Hold ``output_dir``'s lock for one training run; :meth:`release` gives it back."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> "OutputDirLock":
        if fcntl is None:
            logger.warning("no fcntl on this platform: output_dir %s is not locked against a second run",
                           self.output_dir)
            return self
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RuntimeError(
                    f"output_dir {self.output_dir!r} is in use by another training run ({holder}); two runs in one "
                    "output_dir would interleave their checkpoints and metrics. Wait for it, stop it, or use "
                    "another output_dir") from None
            except OSError as e:  # a filesystem without flock: run unlocked, loudly
                os.close(fd)
                logger.warning("cannot lock output_dir %s (%s); a second run there would not be detected",
                               self.output_dir, e)
                return self
            if _same_file(fd, self.path):  # not unlinked by a releasing holder in between
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.datetime.now().isoformat(timespec="seconds")}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: a waiting opener re-checks the inode
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not written its pid yet"


def foreign_checkpoints(output_dir: str, resume_path: str | None,
                        require_finite: bool = False) -> tuple[list[str], list[str], bool, str]:
    """``(valid, broken, superseded, why)``: checkpoint folders in ``output_dir`` not on this run's
    line; ``superseded``: they are this run's own later checkpoints (a resume from an older one)."""
    existing = ck.checkpoint_dirs(output_dir)
    superseded = resume_path is not None and _inside(resume_path, output_dir)
    if superseded:
        match = ck.CHECKPOINT_RE.match(os.path.basename(os.path.normpath(resume_path)))
        resume_step = int(match.group(1)) if match else -1
        candidates = [p for step, p in existing if step > resume_step]
        why = f"newer than the checkpoint this run resumes from ({os.path.basename(os.path.normpath(resume_path))})"
    else:
        candidates = [p for _, p in existing]
        why = "written by another run" if resume_path is None else "not from the run this one resumes"
    valid, broken = [], []
    for path in candidates:
        try:
            ck.verify_checkpoint(path, require_resumable=False)
            # A resume skips newer checkpoints holding NaN/Inf (unless allowed): broken too.
            if require_finite and resume_path is not None and ck.non_finite_tensors(path, limit=1):
                raise ck.CheckpointError("non-finite values")
            valid.append(path)
        except ck.CheckpointError:
            broken.append(path)
    return valid, broken, superseded, why


def claim_output_dir(output_dir: str, resume_path: str | None, overwrite: bool, *, act: bool = True,
                     require_finite: bool = False) -> None:
    """Apply the rule above before a run writes anything; ``act=False`` only checks (other ranks)."""
    valid, broken, superseded, why = foreign_checkpoints(output_dir, resume_path, require_finite)
    names = ", ".join(os.path.basename(p) for p in valid)
    if valid and not overwrite and not superseded:
        raise ValueError(
            f"output_dir {output_dir!r} holds {names}, {why}. This run would write its checkpoints beside them: "
            "rotation deletes by step number and resume_from_checkpoint=True picks the highest, so the runs would "
            "mix. Resume the newest (resume_from_checkpoint=True), use another output_dir, or set "
            "overwrite_output_dir=True to delete them")
    if not act:
        return
    if valid and overwrite:
        logger.warning("overwrite_output_dir=True: deleting %s in %s (%s)", names, output_dir, why)
        for path in valid:
            ck._remove_dir(path)
    elif valid:
        _move_aside(valid, "superseded", f"{why}: this run continues from the older one and will write its own")
    _move_aside(broken, "broken", f"{why} and fail(s) verification or hold(s) NaN/Inf")


def _move_aside(paths: list[str], tag: str, why: str) -> None:
    """Rename ``checkpoint-N`` to ``checkpoint-N.<tag>-<id>``: kept on disk, no longer a checkpoint
    that rotation counts or ``resume_from_checkpoint=True`` picks."""
    for path in paths:
        aside = f"{path}.{tag}-{uuid.uuid4().hex[:8]}"
        logger.warning("%s is %s; moved aside to %s (delete it when no longer needed)", os.path.basename(path), why,
                       os.path.basename(aside))
        os.rename(path, aside)


def _inside(path: str, folder: str) -> bool:
    return os.path.dirname(os.path.realpath(os.path.normpath(path))) == os.path.realpath(folder)
