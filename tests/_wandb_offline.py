"""Read an offline W&B run (``run-<id>.wandb``) back into wandb's own protobuf ``Record`` messages.

wandb 0.31 ships no Python reader for its transaction log (the old ``DataStore`` is gone; the Go
core reads it), so this follows the file format: a 7-byte header (``:W&B``, magic 0xBEE1,
version 0), then LevelDB-log blocks of 32 KiB whose chunks carry a 7-byte header (crc32 4, length 2,
type 1: full/first/middle/last). Each reassembled payload is one ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # the block's tail is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            return
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_records(run_dir: str, timeout: float = 60.0) -> list:
    """The run's records, once it is complete: wandb.finish() can return before wandb-core has
    written the tail of the file, so wait (bounded) for the final ``exit`` record."""
    from wandb.proto import wandb_internal_pb2

    path, = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            records = []
            for payload in _payloads(f.read()):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(payload)
                records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def history(run_dir: str) -> list[dict]:
    """The rows given to ``wandb.log`` (plus wandb's ``_step``, ``_runtime``, ``_timestamp``)."""
    rows = []
    for r in read_records(run_dir):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def summary(run_dir: str) -> dict:
    out = {}
    for r in read_records(run_dir):
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def config(run_dir: str) -> dict:
    out = {}
    for r in read_records(run_dir):
        if r.WhichOneof("record_type") == "config":
            for item in r.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def run_name(run_dir: str) -> str | None:
    for r in read_records(run_dir):
        if r.WhichOneof("record_type") == "run":
            return r.run.display_name
    return None
