"""functrain.io.tensor_file: a safetensors file read once into its tensors, hashed on the way, and
the same tensors, dtypes and metadata as safetensors' own loader; malformed files refused."""

import io
import json
import os

import pytest
import torch
import xxhash
from safetensors.torch import load as st_load, save as st_save, save_file

import functrain.io.checkpoint as ck
from functrain.io import tensor_file as tf


def _all_dtypes():
    out = {}
    for i, (name, dtype) in enumerate(tf.DTYPES.items()):
        base = torch.arange(6 * (i + 1), dtype=torch.float64).reshape(2, 3, i + 1) - 5
        out[f"t_{name}"] = base.to(dtype) if dtype is not torch.complex64 else torch.complex(base, -base).to(dtype)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    out["odd_bf16"] = torch.randn(7, dtype=torch.bfloat16)  # the next tensor starts off a 4-byte boundary
    return out


def _read(data: bytes, hasher=None):
    hasher = hasher or xxhash.xxh3_128()
    return tf.read_tensors(io.BytesIO(data), len(data), hasher), hasher


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dim() else a,
                                                                      b.view(torch.uint8) if b.dim() else b)


@pytest.mark.parametrize("chunk", [tf.CHUNK, 5])
def test_reads_what_safetensors_reads_and_hashes_every_byte(monkeypatch, chunk):
    monkeypatch.setattr(tf, "CHUNK", chunk)  # 5: many chunks per tensor, chunks across nothing else
    data = st_save(_all_dtypes(), metadata={"format": "pt", "step": "3"})
    (tensors, metadata), hasher = _read(data)
    want = st_load(data)
    assert set(tensors) == set(want)
    for name in want:
        assert _same(tensors[name], want[name]), name
    assert metadata == {"format": "pt", "step": "3"}
    assert hasher.hexdigest() == xxhash.xxh3_128(data).hexdigest()


def test_each_tensor_owns_a_writable_aligned_storage():
    (tensors, _), _ = _read(st_save(_all_dtypes()))
    pointers = {t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()}
    assert len(pointers) == sum(1 for t in tensors.values() if t.numel())  # no tensor pins another
    for t in tensors.values():
        assert t.is_contiguous() and t.data_ptr() % t.element_size() == 0
    tensors["t_F32"].add_(1.0)  # a donated step writes into the state it loaded


def test_a_short_read_is_completed():
    data = st_save({"w": torch.randn(100)})

    class Trickle(io.BytesIO):
        def readinto(self, b):
            return super().readinto(memoryview(b)[:3])

    tensors, _ = tf.read_tensors(Trickle(data), len(data), xxhash.xxh3_128())
    assert torch.equal(tensors["w"], st_load(data)["w"])


def test_a_dtype_missing_from_the_table_goes_to_safetensors():
    data = st_save({"q": torch.ones(4).to(torch.float8_e4m3fnuz), "w": torch.ones(2)})
    (tensors, _), hasher = _read(data)
    assert tensors["q"].dtype == torch.float8_e4m3fnuz and torch.equal(tensors["w"], torch.ones(2))
    assert hasher.hexdigest() == xxhash.xxh3_128(data).hexdigest()


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


@pytest.mark.parametrize("data, problem", [
    (b"\x01\x02", "fewer than its 8-byte header length"),
    ((1 << 40).to_bytes(8, "little") + b"{}", "header claims"),
    ((4).to_bytes(8, "little") + b"{x}!", "not JSON"),
    (_with_header([], b""), "not a JSON object"),
    (_with_header({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "no dtype, shape and data_offsets"),
    (_with_header({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "shape"),
    (_with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8), "data_offsets"),
    (_with_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "needs 12 bytes"),
    (_with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "starts at byte 4"),
    (_with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "cover 4 bytes"),
    (_with_header({"__metadata__": {"k": 1}}, b""), "__metadata__"),
])
def test_a_malformed_file_is_refused_after_hashing_it_whole(data, problem):
    hasher = xxhash.xxh3_128()
    with pytest.raises(tf.MalformedFile, match=problem):
        tf.read_tensors(io.BytesIO(data), len(data), hasher)
    assert hasher.hexdigest() == xxhash.xxh3_128(data).hexdigest()  # so a checksum can be checked first


def _checkpoint_with(tmp_path, data: bytes):
    """A checkpoint folder whose only file is ``data`` under a manifest entry that matches it."""
    path = tmp_path / "checkpoint-1"
    path.mkdir()
    (path / ck.RNG_FILE).write_bytes(data)
    ck.write_manifest(str(path), step=1, resumable=False, fsync=False)
    return str(path)


def test_read_checkpoint_refuses_a_malformed_file_its_manifest_lists(tmp_path):
    path = _checkpoint_with(tmp_path, _with_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                                   b"\0" * 8))
    with pytest.raises(ck.CheckpointError, match="rng_state.safetensors.*not a readable safetensors file.*12 bytes"):
        ck.read_checkpoint(path, require_resumable=False)


def test_read_checkpoint_reports_a_corrupted_header_as_corrupted(tmp_path):
    path = _checkpoint_with(tmp_path, st_save({"w": torch.ones(3)}))
    full = os.path.join(path, ck.RNG_FILE)
    data = bytearray(open(full, "rb").read())
    data[9] ^= 0xFF  # inside the JSON header: unreadable, and not what the manifest hashed
    open(full, "wb").write(bytes(data))
    with pytest.raises(ck.CheckpointError, match="fails its checksum"):
        ck.read_checkpoint(path, require_resumable=False)


def test_read_checkpoint_holds_the_files_tensors(tmp_path):
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    path = _checkpoint_with(tmp_path, (tmp_path / "x.safetensors").read_bytes())
    found = ck.read_checkpoint(path, require_resumable=False)
    assert found.holds(ck.RNG_FILE)
    got = found.tensors(ck.RNG_FILE)
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
