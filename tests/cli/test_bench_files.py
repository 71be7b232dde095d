"""`erasekit bench files`: the payload is the size asked for, and the table has ours, the reference and the ratio."""
from __future__ import annotations

from erasekit.cli.bench.files import TENSOR_MB, payload, run_files
from erasekit.cli.main import main


def test_the_payload_adds_up_to_the_size_asked_for_in_checkpoint_sized_tensors():
    tensors = payload(20)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == 20 * 2**20
    assert max(t.numel() * t.element_size() for t in tensors.values()) == TENSOR_MB * 2**20
    assert all(t.dtype.is_floating_point for t in tensors.values())


def test_bench_files_prints_ours_beside_safetensors_and_the_ratio(capsys):
    measured = run_files(2, 1)
    printed = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert [row[0] for row in measured] == ["write", "read", "hash alone"] and set(printed) == {"write", "read", "hash"}
    for name, ours, reference in measured[:2]:
        assert ours > 0 and reference > 0
        assert printed[name][2] == f"{ours / reference:.2f}×"
    assert main(["bench", "files", "--size-mb", "1", "--repeats", "1"]) == 0


def test_bench_files_refuses_an_empty_payload(capsys):
    assert main(["bench", "files", "--size-mb", "0"]) == 2
    assert "--size-mb" in capsys.readouterr().err
