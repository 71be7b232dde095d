"""erasers/files.py and erasers/errors.py: writes that lose nothing, a content hash that catches changes, and errors
that name what is wrong."""
from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch

from erasekit.erasers.errors import (
    FileError,
    InputError,
    LimitError,
    NumberError,
    check_limit,
    check_number,
    check_tensor,
)
from erasekit.erasers.files import (
    HASH_KEY,
    WRITER_KEY,
    content_hash,
    new_file_mode,
    read_safetensors,
    refuse_inputs,
    remove_stale_partials,
    write_atomic,
    write_safetensors,
)


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {"a.up": torch.randn(4, 2, generator=gen), "groups.0.down": torch.randn(2, 3, generator=gen).half()}


def _header(path):
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return size, json.loads(data[8:8 + size]), data


def test_a_written_file_loads_back_equal_with_its_hash_checked(tmp_path):
    path = write_safetensors(tmp_path / "e.safetensors", _tensors(), {"method": "uce"})
    meta, tensors = read_safetensors(path)
    assert meta[WRITER_KEY].startswith("erasekit ")
    assert meta["method"] == "uce" and meta[HASH_KEY] == content_hash(
        _tensors(), {"method": "uce", WRITER_KEY: meta[WRITER_KEY]})
    for key, tensor in _tensors().items():
        assert torch.equal(tensors[key], tensor) and tensors[key].dtype == tensor.dtype


def test_one_changed_byte_in_a_tensor_is_refused_naming_the_file_and_the_hash(tmp_path):
    path = write_safetensors(tmp_path / "e.safetensors", _tensors(), {"method": "uce"})
    size, _, data = _header(path)
    changed = bytearray(data)
    changed[8 + size + 5] ^= 0x01
    path.write_bytes(bytes(changed))
    with pytest.raises(FileError, match=rf"e\.safetensors.*{HASH_KEY}.*changed or damaged"):
        read_safetensors(path)


def test_an_edited_metadata_value_is_refused(tmp_path):
    path = write_safetensors(tmp_path / "e.safetensors", _tensors(), {"method": "uce"})
    size, header, data = _header(path)
    header["__metadata__"]["method"] = "rece"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])
    with pytest.raises(FileError, match=HASH_KEY):
        read_safetensors(path)


def _rewrite_metadata(path, edit):
    size, header, data = _header(path)
    edit(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])


def test_a_file_written_by_erasekit_whose_hash_was_deleted_is_refused_not_loaded_as_foreign(tmp_path):
    path = write_safetensors(tmp_path / "e.safetensors", _tensors(), {"method": "uce"})
    size, _, data = _header(path)
    changed = bytearray(data)
    changed[8 + size + 5] ^= 0x01
    path.write_bytes(bytes(changed))
    _rewrite_metadata(path, lambda meta: meta.pop(HASH_KEY))
    with pytest.raises(FileError, match=r"e\.safetensors.*written by EraseKit but its content hash is missing"):
        read_safetensors(path)


def test_an_erasure_of_the_hashed_format_without_the_hash_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(_tensors(), str(tmp_path / "e.safetensors"), metadata={"erasekit_format": "2"})
    with pytest.raises(FileError, match="erasekit_format.* = 2.*content hash is missing"):
        read_safetensors(tmp_path / "e.safetensors")


def test_the_writer_key_without_the_hash_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(_tensors(), str(tmp_path / "e.safetensors"), metadata={"erasekit_writer": "erasekit 0.1.0"})
    with pytest.raises(FileError, match="erasekit_writer.*content hash is missing"):
        read_safetensors(tmp_path / "e.safetensors")


def test_an_erasure_of_format_1_written_before_the_hash_loads_as_before(tmp_path):
    from safetensors.torch import save_file

    save_file(_tensors(), str(tmp_path / "e.safetensors"), metadata={"erasekit_format": "1", "method": "uce"})
    metadata, tensors = read_safetensors(tmp_path / "e.safetensors")
    assert metadata == {"erasekit_format": "1", "method": "uce"}
    assert all(torch.equal(tensors[k], t) for k, t in _tensors().items())


def test_no_path_at_all_is_a_file_error_not_a_type_error():
    with pytest.raises(FileError, match="no location-token file given"):
        read_safetensors(None, "location-token file")


def test_loaded_tensors_do_not_change_when_the_file_is_rewritten_in_place(tmp_path):
    path = write_safetensors(tmp_path / "e.safetensors", {"a": torch.ones(4096)}, {})
    _, tensors = read_safetensors(path)
    size = path.stat().st_size
    with open(path, "r+b") as out:  # in place, same inode: what a memory map would see
        out.seek(size - 8192)
        out.write(b"\xff" * 8192)
    assert torch.equal(tensors["a"], torch.ones(4096))


def test_a_file_from_another_tool_without_a_hash_loads_as_before(tmp_path):
    from safetensors.torch import save_file

    save_file(_tensors(), str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    meta, tensors = read_safetensors(tmp_path / "foreign.safetensors")
    assert HASH_KEY not in meta and torch.equal(tensors["a.up"], _tensors()["a.up"])


def test_a_truncated_file_is_a_file_error_naming_it(tmp_path):
    path = write_safetensors(tmp_path / "e.safetensors", _tensors(), {})
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(FileError, match=r"e\.safetensors: not a readable \.safetensors file"):
        read_safetensors(path)


def test_a_missing_file_and_a_folder_are_told_apart(tmp_path):
    with pytest.raises(FileError, match="does not exist"):
        read_safetensors(tmp_path / "nothing.safetensors", "erasure")
    with pytest.raises(FileError, match="is a folder, not a file"):
        read_safetensors(tmp_path, "erasure")


@pytest.mark.parametrize("link", ["same path", "hard link", "symlink"])
def test_no_write_lands_on_one_of_its_inputs(tmp_path, link):
    source = tmp_path / "base.safetensors"
    source.write_bytes(b"precious")
    out = {"same path": source, "hard link": tmp_path / "hard", "symlink": tmp_path / "soft"}[link]
    if link == "hard link":
        os.link(source, out)
    elif link == "symlink":
        out.symlink_to(source)
    with pytest.raises(FileError, match="is one of this command's inputs"):
        write_atomic(out, b"erasure", inputs=[source])
    assert source.read_bytes() == b"precious"
    refuse_inputs(tmp_path / "other", [source])  # a different file is fine


def test_written_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "x.txt", "x")
        assert new_file_mode() == 0o644
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_a_rerun_removes_what_a_killed_write_left_beside_the_target(tmp_path):
    stray = tmp_path / ".model.safetensors.abc123.tmp"
    stray.write_bytes(b"half")
    other = tmp_path / ".another.safetensors.abc123.tmp"
    other.write_bytes(b"not ours")
    write_atomic(tmp_path / "model.safetensors", b"whole")
    assert not stray.exists() and other.exists()
    assert remove_stale_partials(tmp_path / "model.safetensors") == []


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "abc", None, 1e39])
def test_a_number_that_is_not_finite_or_out_of_range_is_refused_by_name(value):
    with pytest.raises(NumberError, match="'strength'"):
        check_number("strength", value, low=-10, high=10)


def test_numbers_in_range_pass_and_integers_are_checked():
    assert check_number("strength", "0.5", low=0, high=1) == 0.5
    assert check_number("steps", 3.0, low=1, integer=True) == 3
    with pytest.raises(NumberError, match="an integer"):
        check_number("steps", 2.5, integer=True)
    with pytest.raises(NumberError, match=r"> 0"):
        check_number("scale", 0, low=0, low_inclusive=False)


def test_a_limit_names_itself_and_how_to_raise_it():
    check_limit("concepts", 10, 10, setting="--max-concepts")
    with pytest.raises(LimitError, match=r"11 concepts is more than the limit of 10.*--max-concepts"):
        check_limit("concepts", 11, 10, setting="--max-concepts")


@pytest.mark.parametrize("tensor, found", [
    (torch.tensor([1.0, math.nan]), "1 NaN or infinite"),
    (torch.tensor([1, 2], dtype=torch.int8), "int8"),
    (torch.tensor([True]), "bool"),
    (torch.zeros(0, 3), "non-empty"),
    (torch.ones(2, 3), "shape"),
])
def test_bad_tensors_are_file_errors_naming_file_and_key(tensor, found):
    with pytest.raises(FileError, match=rf"m\.safetensors: 'w'.*{found}") as err:
        check_tensor("m.safetensors", "w", tensor, shape=(2, 4) if found == "shape" else None)
    assert isinstance(err.value, InputError) and isinstance(err.value, ValueError)


def test_every_method_error_belongs_to_the_family():
    from erasekit.erasers.erasure import ErasureFileError, FamilyMismatchError
    from erasekit.erasers.families import FamilyError
    from erasekit.erasers.geom.negatives import GeomError
    from erasekit.erasers.io.checkpoints import CheckpointError
    from erasekit.erasers.io.prompt_lists import PromptListError
    from erasekit.erasers.io.text_encoders import TextEncoderError
    from erasekit.erasers.spm.membrane import MembraneFileError

    for cls in (ErasureFileError, FamilyMismatchError, FamilyError, GeomError, CheckpointError, PromptListError,
                TextEncoderError, MembraneFileError):
        assert issubclass(cls, InputError), cls
