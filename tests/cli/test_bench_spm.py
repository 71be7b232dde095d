"""`erasekit bench spm` end to end on a UNet small enough for the whole suite to run in seconds."""
from __future__ import annotations

import pytest
import torch

from erasekit.cli.bench import spm as bench_spm
from erasekit.cli.main import main
from erasekit.testing.tiny_models import SMALL_SD15_UNET_CONFIG

# SD1.x's 768-wide context (so membranes are of the SD1.x family) on a UNet of a few hundred thousand parameters.


def test_bench_spm_prints_a_row_per_batch_and_membrane_count(monkeypatch, capsys):
    monkeypatch.setitem(bench_spm.UNETS, "tiny-sd15", SMALL_SD15_UNET_CONFIG)
    assert main(["bench", "spm", "--membranes", "0", "3", "--batch", "2", "4", "--latent", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "warm-up" in out and "ref/ours" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("2", "0"), ("2", "3"), ("4", "0"), ("4", "3")]
    for r in rows:
        # batch memb | plain ours overhead | rebuild ref/img ours/img ratio | gates
        assert r[5].endswith("%") and r[10].endswith("x") and all(float(v[:-1]) > 0 for v in (r[3], r[4], r[8], r[9]))
        if r[1] == "0":
            assert r[-1] == "-" and r[7] == "0.0000s"  # nothing to rebuild
        else:
            prompts, negatives = map(float, r[-1].split("/"))
            assert prompts == 1.0 and 0 < negatives < 1  # the gated path runs at two different strengths


def test_bench_spm_restores_the_unet_after_the_reference(monkeypatch):
    monkeypatch.setitem(bench_spm.UNETS, "tiny-sd15", SMALL_SD15_UNET_CONFIG)
    bench = bench_spm._Bench("tiny-sd15", 2, torch.device("cpu"), torch.float32)
    before = {k: v.clone() for k, v in bench.unet.state_dict().items()}
    with torch.no_grad():
        bench.row(2, 2, latent=8, repeats=1, steps=30)
    assert all(torch.equal(v, before[k]) for k, v in bench.unet.state_dict().items())
    assert not hasattr(bench.unet, "_erasekit_membranes")


@pytest.mark.parametrize("argv, message", [
    (["--batch", "3"], "even"),
    (["--membranes", "-1"], "argument --membranes: expected a number in [0, 1000], found -1"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bench_spm_refuses_bad_options_before_running(argv, message, capsys):
    assert main(["bench", "spm", *argv]) == 2
    assert message in capsys.readouterr().err
