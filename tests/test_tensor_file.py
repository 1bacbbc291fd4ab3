"""A quantized folder's tensors read with plain reads: the same tensors as safetensors' own
reader, and a malformed file refused in one line naming it."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmrepl.engine.errors import CheckpointError
from glmrepl.engine.models.quantized_folder import read_tensors
from glmrepl.engine.models.tensor_file import StoredRows
from glmrepl.engine.models.tensor_file import read_tensors as tensors_of

TENSORS = {
    "a.weight": torch.randn(7, 5),
    "b.weight": torch.randn(3, 64).bfloat16(),
    "c.weight_scale": torch.rand(4, 2).half(),
    "d.weight": torch.randint(-128, 127, (9, 16), dtype=torch.int8),
    "e.ids": torch.arange(6, dtype=torch.int64),
    "f.empty": torch.zeros(0, 3),
    "g.flag": torch.tensor([True, False]),
}


def test_every_tensor_equals_safetensors_own_reading(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt"})
    theirs = load_file(str(path))
    ours = dict(tensors_of(path))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_the_folder_reader_widens_floats_and_skips_what_it_is_told(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, str(path))
    state = read_tensors(tmp_path, [path], torch.float32, {"b.weight"})
    assert "b.weight" not in state
    assert state["a.weight"].dtype == torch.float32 and state["c.weight_scale"].dtype == torch.float16
    assert state["d.weight"].dtype == torch.int8


def test_stored_rows_are_the_tensors_rows_read_a_block_at_a_time(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, str(path))
    for name in ("a.weight", "b.weight", "d.weight"):
        rows, tensor = StoredRows(path, name), TENSORS[name]
        assert rows.shape == tuple(tensor.shape) and rows.dtype == tensor.dtype
        for block in (slice(0, 2), slice(2, 3), slice(1, 100), slice(5, 5)):
            assert torch.equal(rows[block], tensor[block]), (name, block)
    with pytest.raises(ValueError, match="not in the file"):
        StoredRows(path, "z.weight")


def header_file(tmp_path, header: object, data: bytes = b"", length: int | None = None):
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "x's byte range"),
        ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "x has no dtype"),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "x's byte range"),
        ({"x": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8, None, "x has no valid shape"),
        ([1, 2], b"", None, "not a JSON object"),
        ({}, b"", 1 << 40, "header is larger than the file"),
    ],
)
def test_a_malformed_file_is_one_line_naming_it(tmp_path, header, data, length, message):
    path = header_file(tmp_path, header, data, length)
    with pytest.raises(CheckpointError, match=f"cannot read model.safetensors: .*{message}") as caught:
        read_tensors(tmp_path, [path], torch.float32)
    assert "\n" not in str(caught.value)


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="cannot read model.safetensors"):
        read_tensors(tmp_path, [path], torch.float32)
