"""Issue #22, the command line: no command writes over one of its inputs (finding 2), every write is atomic and
leaves nothing a rerun does not remove, with clear errors for folders and files this user cannot use (finding 7),
numeric options are finite and in range (finding 4), and erase and batch refuse their quiet no-ops and edge cases
(finding 8). Each test failed on the code before the fix (66b5a21).

Permission cases run the command in a subprocess as the user nobody: the tests run as root, whom file modes do not
stop.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

import erasekit
from erasekit.cli import batch
from erasekit.cli.batch import BatchError
from erasekit.cli.commands import inspect as inspect_command
from erasekit.cli.main import main
from erasekit.erasers.closed_form import recipes
from erasekit.erasers.erasure import Erasure, LayerDelta
from erasekit.erasers.errors import InputError
from erasekit.erasers.io.checkpoints import read_checkpoint
from erasekit.erasers.io.model_files import open_model
from erasekit.erasers.io.prompt_lists import PromptListError, parse_text, read_prompt_file

# The folder that holds the erasekit package as imported here, for the subprocesses' PYTHONPATH.
PACKAGE_PARENT = str(Path(erasekit.__file__).parent.parent)
INPUTS_MESSAGE = "is one of this command's inputs"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _python(code: str, *, user: str | None = None, cwd: Path | None = None):
    """Run `code` in a fresh interpreter that imports this erasekit (as `user`, where given)."""
    env = {"PYTHONPATH": PACKAGE_PARENT, "PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           "HOME": str(cwd or tempfile.gettempdir())}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, user=user, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def open_dir():
    """A folder the user nobody can enter (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="erasekit-hardening-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def erasure_file(tmp_path_factory, tiny_checkpoint) -> Path:
    """An sd1 erasure of the tiny checkpoint's K/V shapes (seeded random deltas)."""
    generator = torch.Generator().manual_seed(3)
    layers = {f"unet.{name}": LayerDelta(dense=0.01 * torch.randn(weight.shape, generator=generator))
              for name, weight in open_model(tiny_checkpoint).kv_weights().items()}
    erasure = Erasure(layers=layers, method="uce", family="sd1", concepts=["x"])
    return erasure.save(tmp_path_factory.mktemp("erasure") / "tiny-x.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Finding 2: no command writes over one of its inputs (the same path, a hard link, a symlink)


def _alias(target: Path, how: str, where: Path) -> Path:
    if how == "same path":
        return target
    where.parent.mkdir(parents=True, exist_ok=True)
    if how == "hard link":
        os.link(target, where)
    else:
        where.symlink_to(target)
    return where


def _file(path: Path, data: bytes = b"a user's file, not to be lost") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _convert(tmp, how):
    source, base = _file(tmp / "official.pt"), _file(tmp / "base.safetensors")
    return ["convert", source, "--base", base, "--out", _alias(base, how, tmp / "alias.safetensors")], [source, base]


def _convert_source(tmp, how):
    source, base = _file(tmp / "official.safetensors"), _file(tmp / "base.safetensors")
    return ["convert", source, "--base", base, "--out", _alias(source, how, tmp / "a.safetensors")], [source, base]


def _erase(tmp, how):
    checkpoint = _file(tmp / "model.safetensors")
    return (["erase", "--method", "uce", "--concept", "dog", "--checkpoint", checkpoint, "--out",
             _alias(checkpoint, how, tmp / "e.safetensors")], [checkpoint])


def _apply(tmp, how):
    erasure, checkpoint = _file(tmp / "e.safetensors"), _file(tmp / "model.safetensors")
    return (["apply", "--erasure", erasure, "--checkpoint", checkpoint, "--out",
             _alias(erasure, how, tmp / "m.safetensors")], [erasure, checkpoint])


def _train_spm(tmp, how):
    weights = _file(tmp / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    return (["train-spm", "--target", "dog", "--model", tmp / "model", "--out",
             _alias(weights, how, tmp / "m.safetensors")], [weights])


def _train_advunlearn(tmp, how):
    config = _file(tmp / "model" / "text_encoder" / "config.json", b"{}")
    out = tmp / "model" / "text_encoder" if how == "same path" else tmp / "encoder"
    if how != "same path":
        _alias(config, how, out / "config.json")
    return ["train-advunlearn", "--concept", "dog", "--model", tmp / "model", "--out", out], [config]


def _train_geom(tmp, how):
    boxes = _file(tmp / "data" / "metadata.jsonl", b'{"file_name": "a.png", "text": "a", "boxes": []}\n')
    return ["train-geom", "--data", tmp / "data", "--out", _alias(boxes, how, tmp / "t.safetensors")], [boxes]


def _batch(tmp, how):
    prompts = _file(tmp / "prompts.txt", b"a dog\n")
    _alias(prompts, "symlink" if how == "same path" else how, tmp / "out" / "manifest.jsonl")
    return ["batch", "--backend", "diffusers", "--prompts", prompts, "--out", tmp / "out"], [prompts]


@pytest.mark.parametrize("how", ["same path", "hard link", "symlink"])
@pytest.mark.parametrize("command", [_convert, _convert_source, _erase, _apply, _train_spm, _train_advunlearn,
                                     _train_geom, _batch], ids=lambda c: c.__name__.strip("_"))
def test_no_command_writes_over_one_of_its_inputs(capsys, tmp_path, command, how):
    argv, inputs = command(tmp_path, how)
    before = {path: path.read_bytes() for path in inputs}
    code, _, err = _run(capsys, *argv)
    assert code == 2 and INPUTS_MESSAGE in err and "choose another output path" in err, err
    assert {path: path.read_bytes() for path in inputs} == before


def test_convert_refuses_an_out_that_is_its_base_before_reading_anything(capsys, tmp_path):
    # A 628 MB checkpoint became a 35 KB erasure, exit 0 (finding 2); the refusal comes before the base is opened.
    base = _file(tmp_path / "sd14.safetensors", b"not even a checkpoint")
    code, _, err = _run(capsys, "convert", tmp_path / "missing.pt", "--base", base, "--out", base)
    assert code == 2 and f"--out {base} {INPUTS_MESSAGE}" in err
    assert "not a readable" not in err and base.read_bytes() == b"not even a checkpoint"


# ---------------------------------------------------------------------------------------------------------------
# Finding 4, the command line: numeric options


@pytest.mark.parametrize("argv, option, expected", [
    (["apply", "--erasure", "e", "--checkpoint", "c", "--out", "o", "--strength", "nan"], "--strength",
     "a finite number in [-4, 4], found 'nan'"),
    (["apply", "--erasure", "e", "--checkpoint", "c", "--out", "o", "--strength", "1e39"], "--strength",
     "a number in [-4, 4], found '1e39'"),
    (["erase", "--method", "uce", "--concept", "a", "--checkpoint", "c", "--out", "o", "--preserve-scale", "nan"],
     "--preserve-scale", "a finite number in [0, 100]"),
    (["erase", "--method", "uce", "--concept", "a", "--checkpoint", "c", "--out", "o", "--lam", "inf"], "--lam",
     "a finite number in (0, 100]"),
    (["erase", "--method", "uce", "--concept", "a", "--checkpoint", "c", "--out", "o", "--erase-scale", "0"],
     "--erase-scale", "a number in (0, 100]"),
    (["batch", "--prompts", "p", "--out", "o", "--backend", "diffusers", "--guidance", "nan"], "--guidance",
     "a finite number in [0, 100]"),
    (["batch", "--prompts", "p", "--out", "o", "--seed", "-1"], "--seed", "[0, 1.84467e+19]"),
    (["batch", "--prompts", "p", "--out", "o", "--backend", "diffusers", "--steps", "2.5"], "--steps",
     "an integer, found '2.5'"),
    (["train-spm", "--target", "a", "--out", "o.safetensors", "--lr=-1e-4"], "--lr", "(0, 1]"),
    (["train-geom", "--out", "o", "--alpha", "nan"], "--alpha", "a finite number ≤ 1000, found 'nan'"),
    (["train-geom", "--out", "o", "--caption-dropout", "1.5", "--alpha", "0"], "--caption-dropout", "[0, 1]"),
    (["bench", "spm", "--membranes", "nan"], "--membranes", "a finite number in [0, 1000], found 'nan'"),
])
def test_numeric_options_refuse_nan_infinity_and_out_of_range_naming_the_option(capsys, argv, option, expected):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert err.strip() == f"error: argument {option}: expected {expected}" or \
        (err.startswith(f"error: argument {option}: expected ") and expected in err), err
    assert "Traceback" not in err and err.count("\n") == 1


def test_seeds_keep_their_exact_value_up_to_the_top_of_the_range():
    from erasekit.cli.common import number

    top = 2**64 - 1  # a float would round it to 2**64
    assert number(0, top, integer=True)(str(top)) == top


# ---------------------------------------------------------------------------------------------------------------
# main: bad input is one error line, a bug keeps its traceback


def test_main_turns_input_and_os_errors_into_one_line_and_keeps_a_bugs_traceback(capsys, monkeypatch):
    def raising(error):
        def run(args):
            raise error
        return run

    monkeypatch.setattr(inspect_command, "run", raising(InputError(file="x.safetensors", key="k", expected="e",
                                                                   found="f")))
    assert _run(capsys, "inspect", "x")[2] == "error: x.safetensors: 'k': expected e, found f\n"
    monkeypatch.setattr(inspect_command, "run", raising(PermissionError(13, "Permission denied", "/data/x")))
    assert _run(capsys, "inspect", "x")[:3:2] == (2, "error: /data/x: Permission denied\n")
    monkeypatch.setattr(inspect_command, "run", raising(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect", "x"])


# ---------------------------------------------------------------------------------------------------------------
# Finding 7: leftovers and I/O


def _strays(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_killed_apply_leaves_nothing_that_a_rerun_does_not_remove(capsys, tmp_path, tiny_checkpoint,
                                                                     erasure_file):
    out = tmp_path / "out" / "merged.safetensors"
    argv = ["apply", "--erasure", str(erasure_file), "--checkpoint", str(tiny_checkpoint), "--out", str(out)]
    # SIGKILL at the last moment of the write: the whole temporary file is on disk, not yet renamed.
    killed = _python(f"""
        import os, signal
        os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        from erasekit.cli.main import main
        main({argv!r})
    """)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and _strays(out.parent), "the kill came before the temporary file was written"
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.safetensors"]
    merged = read_checkpoint(out)
    assert merged.keys() == read_checkpoint(tiny_checkpoint).keys()


def test_a_killed_folder_write_leaves_no_half_folder_and_the_next_write_clears_it(tmp_path):
    out = tmp_path / "merged"
    killed = _python(f"""
        import os, signal
        from pathlib import Path
        from erasekit.erasers.files import write_folder

        def fill(folder):
            (folder / "unet").mkdir()
            (folder / "unet" / "half.bin").write_bytes(b"half a model")
            os.kill(os.getpid(), signal.SIGKILL)

        write_folder({str(out)!r}, fill)
    """)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and len(_strays(tmp_path)) == 1
    from erasekit.erasers.files import write_folder

    write_folder(out, lambda folder: (folder / "model_index.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json"]


def test_a_folder_written_beside_its_name_gets_the_umask_mode_not_mkdtemps_0700(tmp_path):
    from erasekit.erasers.files import write_folder

    old = os.umask(0o027)
    try:
        write_folder(tmp_path / "m", lambda folder: (folder / "f").write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750  # mkdtemp alone would give 0700
    assert (tmp_path / "m" / "f").read_text() == "x"


def _nobody_can_run(folder: Path) -> None:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to run the permission case as")
    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")
    probe = _python("import erasekit.cli.main", user="nobody", cwd=folder)
    if probe.returncode:
        pytest.skip(f"the user nobody cannot import this erasekit: {probe.stderr[-300:]}")


def test_a_read_only_out_folder_is_one_error_line_not_a_traceback(open_dir, tiny_checkpoint, erasure_file):
    _nobody_can_run(open_dir)
    checkpoint, erasure = open_dir / "model.safetensors", open_dir / "e.safetensors"
    shutil.copy(tiny_checkpoint, checkpoint)
    shutil.copy(erasure_file, erasure)
    for path in (checkpoint, erasure):
        path.chmod(0o644)
    locked = open_dir / "read-only"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    result = _python(f"""
        import sys
        from erasekit.cli.main import main
        sys.exit(main(["apply", "--erasure", {str(erasure)!r}, "--checkpoint", {str(checkpoint)!r},
                       "--out", {str(locked / 'm.safetensors')!r}]))
    """, user="nobody", cwd=open_dir)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and str(locked) in errors[0] and "permission denied" in errors[0]
    assert list(locked.iterdir()) == []


def test_an_unreadable_checkpoint_says_permission_denied(open_dir, tiny_checkpoint, erasure_file):
    _nobody_can_run(open_dir)
    checkpoint, erasure = open_dir / "model.safetensors", open_dir / "e.safetensors"
    shutil.copy(tiny_checkpoint, checkpoint)
    shutil.copy(erasure_file, erasure)
    erasure.chmod(0o644)
    checkpoint.chmod(0o000)
    for argv in (["inspect", str(checkpoint)],
                 ["apply", "--erasure", str(erasure), "--checkpoint", str(checkpoint), "--out",
                  str(open_dir / "m.safetensors")]):
        result = _python(f"""
            import sys
            from erasekit.cli.main import main
            sys.exit(main({argv!r}))
        """, user="nobody", cwd=open_dir)
        assert result.returncode == 2 and f"{checkpoint} cannot be read (permission denied)" in result.stderr, \
            result.stderr
        assert "No such file" not in result.stderr and "Traceback" not in result.stderr


def test_merged_checkpoints_and_erasures_get_the_umask_mode(capsys, tmp_path, tiny_checkpoint, erasure_file):
    old = os.umask(0o027)
    try:
        code, _, err = _run(capsys, "apply", "--erasure", erasure_file, "--checkpoint", tiny_checkpoint, "--out",
                            tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o640


def test_a_resume_checkpoint_is_written_atomically_with_the_umask_mode(tmp_path):
    from erasekit.erasers.training import resumable

    class Counter:
        step_count = 0

        def step(self):
            self.step_count += 1
            return {"loss": 0.0}

        def state_dict(self):
            return {"step": torch.tensor(self.step_count)}

        def load_state_dict(self, state):
            self.step_count = int(state["step"])

    checkpoint = tmp_path / "m.safetensors.resume.pt"
    _file(tmp_path / f".{checkpoint.name}.abc.tmp", b"a killed run's half file")
    old = os.umask(0o027)
    try:
        resumable.run(Counter(), 3, checkpoint, every=2)
    finally:
        os.umask(old)
    assert int(torch.load(checkpoint, weights_only=True)["step"]) == 2
    assert checkpoint.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.name]


# ---------------------------------------------------------------------------------------------------------------
# Finding 8: quiet no-ops and batch edges


@pytest.mark.parametrize("extra, message", [
    (["--concept", "Van Gogh", "--guide", "  van   gogh "], "concept 'Van Gogh' with guide '  van   gogh '"),
    (["--concept", "dog", "--concept", "cat", "--preserve", "CAT"], "'cat' both erased and preserved (as 'CAT')"),
])
def test_erase_refuses_a_concept_that_is_its_own_guide_or_a_preserved_concept(capsys, tmp_path, extra, message):
    code, _, err = _run(capsys, "erase", "--method", "uce", *extra, "--checkpoint", tmp_path / "nope.safetensors",
                        "--out", tmp_path / "e.safetensors")
    assert code == 2 and message in err and "nope" not in err, err
    assert not (tmp_path / "e.safetensors").exists()


def test_the_library_refuses_the_same_no_op_erasures_as_the_command():
    with pytest.raises(InputError, match="'guide': expected a guide other than the concept it replaces"):
        recipes.EraseOptions(method="rece", concepts=["art"], preset="art").validate()  # the preset's guide "art"
    with pytest.raises(InputError, match="both erased and preserved"):
        recipes.EraseOptions(concepts=["a dog"], preserve=["A  Dog"]).validate()
    recipes.EraseOptions(concepts=["a dog"], guide=["a cat"], preserve=["a bird"]).validate()


def test_a_csv_field_over_the_csv_limit_is_a_prompt_list_error_naming_file_and_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt\n"a dog\n' + "x" * 140_000 + '"\nlast\n')
    with pytest.raises(PromptListError, match=rf"{path} line \d+: not a readable CSV row \(field larger than"):
        read_prompt_file(path)


def test_batch_errors_are_input_errors():
    assert issubclass(BatchError, InputError)


@pytest.mark.parametrize("line, found", [
    ({"index": [0], "files": ["00000.png"]}, "'index' is [0]"),
    ({"index": 0, "files": ["../outside.png"]}, "'files' holds \"../outside.png\""),
    ({"index": 0, "files": "00000.png"}, "'files' holds \"00000.png\""),
])
def test_a_manifest_line_with_a_bad_index_or_a_file_outside_out_is_a_batch_error(tmp_path, line, found):
    out = tmp_path / "out"
    out.mkdir()
    _file(out / "00000.png", b"png")
    _file(tmp_path / "outside.png", b"png")
    record = {"prompt": "a", "seed": 0, "guidance": None, "categories": None, "erasures": [], **line}
    (out / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(BatchError, match=rf"manifest.jsonl line 1: {_escape(found)}"):
        batch.Manifest(out, parse_text("a"), [])


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_two_runs_on_one_out_are_locked_against_each_other(tmp_path, capsys):
    out = tmp_path / "out"
    first = batch.Manifest(out, parse_text("a"), [])
    with pytest.raises(BatchError, match=rf"another batch run \(pid {os.getpid()}\) is writing to {out}"):
        batch.Manifest(out, parse_text("a"), [])
    first.close()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]  # the lock goes with the run
    batch.Manifest(out, parse_text("a"), []).close()
    # Another process's run, through the command: refused, the folder untouched.
    prompts = _file(tmp_path / "p.txt", b"a\n")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from erasekit.cli import batch
        from erasekit.erasers.io.prompt_lists import parse_text
        batch.Manifest(batch.Path({str(out)!r}), parse_text("a"), [])
        print("locked", flush=True)
        time.sleep(600)
    """)], env={**os.environ, "PYTHONPATH": PACKAGE_PARENT}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = _run(capsys, "batch", "--backend", "diffusers", "--prompts", prompts, "--out", out)
        assert code == 2 and f"another batch run (pid {holder.pid}) is writing to {out}" in err, err
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed run's lock is free again: the kernel drops it
        holder.wait()
    assert (out / batch.LOCK).exists()  # left by the kill
    batch.Manifest(out, parse_text("a"), []).close()
    assert not (out / batch.LOCK).exists()


def test_a_folder_holding_only_a_stale_lock_is_still_a_batch_folder(tmp_path):
    out = tmp_path / "out"
    _file(out / batch.LOCK, b"12345")
    batch.Manifest(out, parse_text("a"), []).close()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]


def test_all_dead_servers_are_an_error_naming_each(capsys, tmp_path):
    from test_batch import _workflow  # tests/cli is on sys.path

    from erasekit.cli.comfy_server import _free_port

    workflow = _file(tmp_path / "wf.json", json.dumps(_workflow()).encode())
    prompts = _file(tmp_path / "p.txt", b"a\n")
    urls = [f"http://127.0.0.1:{_free_port()}" for _ in range(2)]
    code, _, err = _run(capsys, "batch", "--workflow", workflow, "--prompts", prompts, "--out", tmp_path / "out",
                        *(a for url in urls for a in ("--server", url)))
    assert code == 2 and "no ComfyUI server answers" in err and all(f"cannot reach ComfyUI at {u}" in err for u in urls)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_one_dead_server_of_two_is_a_warning_and_the_run_goes_on(comfy_server, tiny_checkpoint, tmp_path, capsys):
    from test_batch import _manifest, _workflow

    from erasekit.cli.comfy_server import _free_port

    dead = f"http://127.0.0.1:{_free_port()}"
    workflow = _file(tmp_path / "wf.json", json.dumps(_workflow(tiny_checkpoint.name, erase=False)).encode())
    prompts = _file(tmp_path / "p.txt", b"a\nb\n")
    code, out, err = _run(capsys, "batch", "--workflow", workflow, "--prompts", prompts, "--out", tmp_path / "out",
                          "--server", dead, "--server", comfy_server.client.url)
    assert code == 0, err
    assert f"warning: cannot reach ComfyUI at {dead}" in err and "going on with the 1 server(s) that answer" in err
    assert "2/2 prompts done" in out
    assert {r["server"] for r in _manifest(tmp_path / "out")} == {comfy_server.client.url}


@pytest.mark.parametrize("text", ['{"3": {"inputs": {"cfg": NaN}}}', '{"3": {"inputs": {"cfg": -Infinity}}}',
                                  '{"3": {"inputs": {"cfg": 1e999}}}'])
def test_a_workflow_holding_nan_or_infinity_is_a_batch_error_naming_it(tmp_path, text):
    from erasekit.cli.batch import BatchError, Workflow

    path = _file(tmp_path / "wf.json", text.encode())
    with pytest.raises(BatchError, match="wf.json is not JSON in UTF-8.*not a finite number"):
        Workflow.load(path)


def test_a_workflow_that_is_not_utf8_is_a_batch_error_naming_it(tmp_path):
    from erasekit.cli.batch import BatchError, Workflow

    path = _file(tmp_path / "wf.json", b'{"3": {"inputs": {"text": "\xff"}}}')
    with pytest.raises(BatchError, match="wf.json is not JSON in UTF-8"):
        Workflow.load(path)


def test_finite_json_reads_what_json_reads_except_non_finite_numbers():
    from erasekit.cli.batch import finite_json

    text = '{"a": [1, 2.5, -3e10, "NaN"], "b": {"c": null, "d": true}}'
    assert finite_json(text) == json.loads(text)
    for bad in ("NaN", "Infinity", "-Infinity", "[1e309]"):
        with pytest.raises(ValueError, match="not a finite number"):
            finite_json(bad)
