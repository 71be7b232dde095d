"""What the nodes accept from a prompt (nodes/inputs.py): files only from inside ComfyUI's folders, numbers only
within their widgets' ranges, work only within limits; in-process, plus real-server checks (issue #22, findings 1,
4 and 6)."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

import erasekit
from erasekit.cli.comfy_server import ComfyError, ComfyServer
from erasekit.erasers.errors import FileError, LimitError, NumberError
from erasekit.erasers.io.prompt_lists import MAX_SEED
from erasekit.nodes import inputs
from erasekit.nodes.prompt_list import NO_FILE

NODES = erasekit.NODE_CLASS_MAPPINGS
SECRET = "s3cret-column-of-someone-else"


@pytest.fixture
def input_dir(comfy, tmp_path, monkeypatch):
    """ComfyUI's input folder in tmp_path/input, a prompt file in it and one beside it (outside)."""
    import folder_paths

    folder = tmp_path / "input"
    (folder / "lists").mkdir(parents=True)
    (folder / "prompts.txt").write_text("a red circle\na blue square\n")
    (folder / "lists" / "two.csv").write_text("prompt,evaluation_seed\na green star,7\n")
    (folder / "picture.png").write_bytes(b"\x89PNG")
    (tmp_path / "outside.txt").write_text(f"{SECRET}\n")
    monkeypatch.setattr(folder_paths, "input_directory", str(folder))
    return folder


def _build(clip, file: str, prompts: str = "", **kwargs):
    args = dict(clip=clip, prompts=prompts, file=file, negative="", seed=0, start=0, count=0, width=64, height=64)
    args.update(kwargs)
    with torch.inference_mode():
        return NODES["EraseKitPromptList"]().build(**args)


# --- 1. files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.txt", "lists/../../outside.txt", "~/outside.txt",
                                  "..\\outside.txt", "/proc/self/environ"])
def test_prompt_list_refuses_a_file_outside_the_input_folder_and_reads_nothing(loaded, input_dir, name):
    with pytest.raises(FileError, match=r"'file': expected a file name inside the input folder") as caught:
        _build(loaded[1], name)
    assert SECRET not in str(caught.value) and "root:" not in str(caught.value)
    verdict = NODES["EraseKitPromptList"].VALIDATE_INPUTS(file=name)
    assert verdict is not True and "absolute paths and '..' are refused" in verdict


def test_prompt_list_refuses_a_symlink_that_leads_out_of_the_input_folder(loaded, input_dir):
    (input_dir / "link.txt").symlink_to(input_dir.parent / "outside.txt")
    with pytest.raises(FileError, match=r"'link.txt' resolves outside it \(a symlink leading out\)") as caught:
        _build(loaded[1], "link.txt")
    assert SECRET not in str(caught.value)
    assert NODES["EraseKitPromptList"].IS_CHANGED(file="link.txt") == ""  # not even its time is read


def test_prompt_list_picks_files_of_the_input_folder_by_plain_or_annotated_name(loaded, input_dir):
    spec = NODES["EraseKitPromptList"].INPUT_TYPES()["required"]["file"]
    assert spec[0] == [NO_FILE, "lists/two.csv", "prompts.txt"]  # the picker: .csv/.txt only, subfolders included
    for name in ("prompts.txt", "prompts.txt [input]", "[input] prompts.txt"):
        assert NODES["EraseKitPromptList"].VALIDATE_INPUTS(file=name) is True
        *_, prompts = _build(loaded[1], name)
        assert prompts == ["a red circle", "a blue square"]
    *_, latent, noise, prompts = _build(loaded[1], "lists/two.csv")
    assert prompts == ["a green star"] and noise.seeds == [7]


def test_prompt_list_keeps_old_workflows_that_typed_prompts_with_an_empty_file(loaded, input_dir):
    assert NODES["EraseKitPromptList"].VALIDATE_INPUTS(file="") is True
    for file in ("", NO_FILE):
        *_, prompts = _build(loaded[1], file, prompts="one\ntwo")
        assert prompts == ["one", "two"]


def test_prompt_list_errors_quote_nothing_of_the_file(loaded, input_dir):
    (input_dir / "secret.csv").write_text(f"{SECRET},other\nx,y\n")
    with pytest.raises(FileError, match=r"no 'prompt' column \(its columns: 2, none named 'prompt'\)") as caught:
        _build(loaded[1], "secret.csv")
    assert SECRET not in str(caught.value)
    (input_dir / "seeds.csv").write_text(f"prompt,evaluation_seed\na cat,{SECRET}\n")
    with pytest.raises(FileError, match=r"row 1 \(line 2\): evaluation_seed is not a whole number") as caught:
        _build(loaded[1], "seeds.csv")
    assert SECRET not in str(caught.value)


@pytest.fixture
def erasure_file(loaded, tmp_path_factory):
    """An erasure of the tiny checkpoint, saved outside any ComfyUI folder."""
    path = tmp_path_factory.mktemp("elsewhere") / "red.safetensors"
    with torch.inference_mode():
        _, erasure = NODES["EraseKitEraseConcepts"]().erase(loaded[0], loaded[1], "uce", "red circle", "", "", 1.0)
    erasure.save(path)
    return path


def test_model_file_inputs_resolve_inside_their_folder_only(loaded, erasure_file, tmp_path, monkeypatch):
    import folder_paths

    folder = tmp_path / "erasers"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "erasers", ([str(folder)], {".safetensors"}))
    (folder / "inside.safetensors").write_bytes(erasure_file.read_bytes())
    (folder / "out.safetensors").symlink_to(erasure_file)
    node = NODES["EraseKitLoadErasure"]()
    with torch.inference_mode():
        model, erasure = node.load(loaded[0], "inside.safetensors", 1.0)
    assert erasure.concepts == ["red circle"]
    with pytest.raises(FileError, match=r"'erasure_name': expected a file inside models/erasers, found "
                                        r"'out.safetensors' resolves outside it"):
        node.load(loaded[0], "out.safetensors", 1.0)
    for name in (str(erasure_file), f"../{erasure_file.parent.name}/{erasure_file.name}"):
        with pytest.raises(FileError, match=r"'erasure_name': expected a file name inside models/erasers"):
            node.load(loaded[0], name, 1.0)
    with pytest.raises(FileError, match=r"'erasure_name': expected a file in models/erasers, found no file "
                                        r"'missing.safetensors' there"):
        node.load(loaded[0], "missing.safetensors", 1.0)


def test_save_erasure_refuses_a_prefix_through_a_symlinked_subfolder(loaded, erasure_file, tmp_path, monkeypatch):
    import folder_paths

    from erasekit.erasers.erasure import Erasure

    folder, elsewhere = tmp_path / "erasers", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "out").symlink_to(elsewhere)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "erasers", ([str(folder)], {".safetensors"}))
    erasure = Erasure.load(erasure_file)
    with pytest.raises(FileError, match=r"'filename_prefix': expected a file inside models/erasers, found "
                                        r"'out/x' resolves outside it"):
        NODES["EraseKitSaveErasure"]().save(erasure, "out/x")
    assert list(elsewhere.iterdir()) == []
    saved = NODES["EraseKitSaveErasure"]().save(erasure, "in/x")
    assert saved["ui"]["text"][0].startswith("saved in/x_00001.safetensors")


def test_a_model_folder_that_is_itself_a_symlink_still_works(loaded, erasure_file, tmp_path, monkeypatch):
    """Users link whole model folders from a larger disk: the folder's real path is the bound, not its name."""
    import folder_paths

    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "e.safetensors").write_bytes(erasure_file.read_bytes())
    (tmp_path / "erasers").symlink_to(tmp_path / "disk")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "erasers", ([str(tmp_path / "erasers")],
                                                                        {".safetensors"}))
    assert inputs.folder_file("erasers", "e.safetensors", "erasure_name") == str(tmp_path / "erasers" /
                                                                                  "e.safetensors")


# --- 2. numbers ------------------------------------------------------------------------------------------------


def _numeric_inputs() -> list[tuple[str, str, str, dict]]:
    return [(node, name, kind, options) for node, cls in NODES.items()
            for name, kind, options in inputs.number_inputs(cls)]


def test_every_numeric_input_of_every_node_is_covered(comfy):
    covered = {(node, name) for node, name, _, _ in _numeric_inputs()}
    for node, name in [("EraseKitEraseConcepts", "strength"), ("EraseKitEraseConcepts", "lamb"),
                       ("EraseKitLoadErasure", "strength"), ("EraseKitLoadMembrane", "strength"),
                       ("EraseKitLoadAdvUnlearn", "strength"), ("EraseKitPromptList", "seed"),
                       ("EraseKitGeomErasingNegative", "grid")]:
        assert (node, name) in covered
    for node, cls in NODES.items():  # the check wraps the function ComfyUI calls
        assert not inputs.number_inputs(cls) or hasattr(getattr(cls, cls.FUNCTION), "__wrapped__"), node


def _call_with(node: str, name: str, value):
    """The node's function with every numeric input at its default, `name` at `value`, the rest None: the
    check runs before the function's body, so nothing else is needed."""
    import inspect

    cls = NODES[node]
    method = getattr(cls, cls.FUNCTION)
    args = {p: None for p in list(inspect.signature(method).parameters)[1:]}
    args.update({n: o.get("default", o.get("min", 0)) for n, _, o in inputs.number_inputs(cls)})
    args[name] = value
    return method(cls(), **args)


def test_a_nan_inf_or_out_of_range_number_is_refused_naming_the_input_and_its_range(comfy):
    checked = 0
    for node, name, _, options in _numeric_inputs():
        cls_name = NODES[node].__name__
        bad = [math.nan, math.inf, -math.inf]
        if "max" in options:
            bad.append(options["max"] + 1)
        if "min" in options:
            bad.append(options["min"] - 1)
        for value in bad:
            with pytest.raises(NumberError, match=rf"'{cls_name}\.{name}': expected .*(finite|in \[).*found"
                               ) as caught:
                _call_with(node, name, value)
            if "min" in options and "max" in options:
                assert f"in [{options['min']:g}, {options['max']:g}]" in str(caught.value)
            checked += 1
        for value in {options.get("min"), options.get("max"), options.get("default")} - {None}:
            inputs.check_numbers(NODES[node], {name: value})  # the widget's own values pass
    assert checked == 5 * len(_numeric_inputs()) and len(_numeric_inputs()) >= 15  # 15 inputs over 6 nodes today


def test_a_seed_at_its_maximum_passes_and_one_above_is_refused():
    inputs.check_numbers(NODES["EraseKitPromptList"], {"seed": MAX_SEED})
    with pytest.raises(NumberError, match="'PromptList.seed'"):
        inputs.check_numbers(NODES["EraseKitPromptList"], {"seed": MAX_SEED + 1})
    with pytest.raises(NumberError, match="'PromptList.count': expected an integer"):
        inputs.check_numbers(NODES["EraseKitPromptList"], {"count": 2.5})


# --- 3. limits -------------------------------------------------------------------------------------------------


def _erase(loaded, concepts: str, **kwargs):
    args = dict(method="uce", concepts=concepts, guide="", preserve="", strength=1.0)
    args.update(kwargs)
    with torch.inference_mode():
        return NODES["EraseKitEraseConcepts"]().erase(loaded[0], loaded[1], **args)


def test_ten_thousand_concepts_are_refused_at_once_naming_the_limit(loaded, monkeypatch):
    monkeypatch.delenv("ERASEKIT_MAX_CONCEPTS", raising=False)
    concepts = "\n".join(f"concept {i}" for i in range(10_000))
    started = time.perf_counter()
    with pytest.raises(LimitError, match=r"10000 concepts to erase is more than the limit of 500: .*"
                                         r"ERASEKIT_MAX_CONCEPTS=<count>"):
        _erase(loaded, concepts)
    assert time.perf_counter() - started < 2.0  # nothing was encoded (one prompt alone takes ~0.1 s here)
    with pytest.raises(LimitError, match="600 concepts to preserve"):
        _erase(loaded, "red circle", preserve=";".join(f"p{i}" for i in range(600)))


def test_a_raised_concept_limit_lets_the_work_through(loaded, monkeypatch):
    from erasekit.erasers.closed_form import recipes
    from erasekit.nodes.closed_form import check_work

    many = recipes.EraseOptions(method="uce", concepts=[f"c{i}" for i in range(800)], guide=[], preserve=[])
    with pytest.raises(LimitError):
        check_work(many)
    monkeypatch.setenv("ERASEKIT_MAX_CONCEPTS", "1000")
    check_work(many)
    monkeypatch.setenv("ERASEKIT_MAX_CONCEPTS", "lots")
    with pytest.raises(ValueError, match=r"'ERASEKIT_MAX_CONCEPTS': expected a whole number ≥ 1, found 'lots'"):
        check_work(many)


def test_a_prompt_above_the_token_limit_is_refused_before_encoding(loaded, monkeypatch):
    monkeypatch.delenv("ERASEKIT_MAX_PROMPT_TOKENS", raising=False)
    long = " ".join(["red"] * 400)
    with pytest.raises(LimitError, match=r"400 tokens in the prompt 'red red .*limit of 300.*"
                                         r"ERASEKIT_MAX_PROMPT_TOKENS"):
        _erase(loaded, "circle", preserve=long)
    with pytest.raises(LimitError, match=r"400 tokens in prompt 1 is more than the limit of 300"):
        _build(loaded[1], NO_FILE, prompts=f"a cat\n{long}")
    monkeypatch.setenv("ERASEKIT_MAX_PROMPT_TOKENS", "500")
    assert inputs.prompt_tokens(loaded[1], long, "it") == 400


def test_a_prompt_list_above_the_prompt_limit_is_refused_before_encoding(loaded, monkeypatch):
    monkeypatch.setenv("ERASEKIT_MAX_PROMPTS", "3")
    with pytest.raises(LimitError, match=r"4 prompts in the batch is more than the limit of 3.*ERASEKIT_MAX_PROMPTS"):
        _build(loaded[1], NO_FILE, prompts="a\nb\nc\nd")
    *_, prompts = _build(loaded[1], NO_FILE, prompts="a\nb\nc\nd", start=1)
    assert prompts == ["b", "c", "d"]


def test_erase_concepts_stops_at_comfyuis_interrupt_between_batches_and_reports_progress(loaded, comfy):
    import comfy.model_management
    import comfy.utils

    _, clip = loaded
    calls, progress = [], []
    original = clip.encode_from_tokens

    def counted(tokens, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            comfy.model_management.interrupt_current_processing(True)  # the Cancel button, mid-way
        return original(tokens, *args, **kwargs)

    clip.encode_from_tokens = counted
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, **_: progress.append((value, total)))
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _erase(loaded, "\n".join(f"concept {i}" for i in range(100)))
    finally:
        del clip.encode_from_tokens
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert len(calls) == 2  # it stopped after the call that saw the interrupt
    (done, total), = progress  # the bar moved after the first batch; the second ended in the interrupt
    assert total == 100 and 1 <= done < 100


# --- against a real ComfyUI ------------------------------------------------------------------------------------


def _prompt_list_prompt(ckpt: str, file: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "EraseKitPromptList", "inputs": {
            "clip": ["1", 1], "prompts": "", "file": file, "negative": "", "seed": 0, "start": 0, "count": 0,
            "width": 64, "height": 64}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["2", 2], "seed": 0,
            "steps": 1, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "erasekit_inputs"}},
    }


def _erase_prompt(ckpt: str, strength, concepts: str = "red circle") -> dict:
    prompt = _prompt_list_prompt(ckpt, NO_FILE)
    prompt["2"]["inputs"]["prompts"] = "a red circle"
    prompt["6"] = {"class_type": "EraseKitEraseConcepts", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "method": "uce", "concepts": concepts, "guide": "", "preserve": "",
        "strength": strength}}
    prompt["3"]["inputs"]["model"] = ["6", 0]
    return prompt


@pytest.mark.slow
@pytest.mark.parametrize("name", ["/etc/passwd", "../../../../../../etc/passwd"])
def test_a_server_refuses_etc_passwd_through_the_prompt_list_and_keeps_it_out_of_history(comfy_server,
                                                                                          tiny_checkpoint, name):
    client = comfy_server.client
    with pytest.raises(ComfyError, match=r"absolute paths and '\.\.' are refused") as caught:
        client.queue(_prompt_list_prompt(tiny_checkpoint.name, name))
    assert "root:" not in str(caught.value).split("--- server log ---")[0]
    assert "root:x:0:0" not in json.dumps(client.get_json("/history"))


@pytest.mark.slow
def test_a_server_refuses_a_nan_strength_naming_the_input_and_runs_the_next_good_prompt(comfy_server,
                                                                                        tiny_checkpoint):
    client = comfy_server.client
    with pytest.raises(ComfyError, match=r"'EraseConcepts\.strength': expected a finite number in \[-4, 4\], "
                                         r"found nan"):
        client.run(_erase_prompt(tiny_checkpoint.name, math.nan), timeout=300)
    entry = client.run(_erase_prompt(tiny_checkpoint.name, 1.0), timeout=300)
    assert len(client.images(entry)) == 1


@pytest.mark.slow
def test_a_server_refuses_ten_thousand_concepts_at_once(comfy_server, tiny_checkpoint):
    concepts = "\n".join(f"concept {i}" for i in range(10_000))
    started = time.perf_counter()
    with pytest.raises(ComfyError, match=r"10000 concepts to erase is more than the limit of 500.*"
                                         r"ERASEKIT_MAX_CONCEPTS"):
        comfy_server.client.run(_erase_prompt(tiny_checkpoint.name, 1.0, concepts), timeout=120)
    print(f"10,000 concepts refused in {time.perf_counter() - started:.2f} s (queue to error; loading the "
          "checkpoint included when not cached)")


@pytest.mark.slow
def test_a_thousand_concepts_stop_within_seconds_of_post_interrupt(tmp_path, tiny_checkpoint, monkeypatch):
    import psutil

    monkeypatch.setenv("ERASEKIT_MAX_CONCEPTS", "1000")  # the server inherits the environment: the limit raised
    concepts = "\n".join(f"concept number {i}" for i in range(1000))
    with ComfyServer(workdir=tmp_path) as client:
        server_pid = _server_pid(client)
        (tmp_path / "ComfyUI" / "models" / "checkpoints" / tiny_checkpoint.name).symlink_to(tiny_checkpoint)
        client.run(_erase_prompt(tiny_checkpoint.name, 1.0), timeout=300)  # the checkpoint loaded and cached
        process = psutil.Process(server_pid)
        prompt_id = client.queue(_erase_prompt(tiny_checkpoint.name, 1.0, concepts))
        peak = 0
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # well into the encoding of the 2,000 prompts
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.1)
        client._request("/interrupt", {})
        asked = time.perf_counter()
        while time.perf_counter() - asked < 60:
            peak = max(peak, process.memory_info().rss)
            entry = client.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str"):
                break
            time.sleep(0.1)
        stopped = time.perf_counter() - asked
        interrupted = [data for kind, data in entry["status"]["messages"] if kind == "execution_interrupted"]
        print(f"1,000 concepts: /interrupt → prompt ended in {stopped:.2f} s; server peak RSS "
              f"{peak / 2**30:.2f} GiB")
        assert stopped < 10 and interrupted[0]["node_type"] == "EraseKitEraseConcepts"  # inside the encoding
        entry = client.run(_erase_prompt(tiny_checkpoint.name, 1.0), timeout=300)  # the server goes on
        assert len(client.images(entry)) == 1


def _server_pid(client) -> int:
    """The ComfyUI process listening on the client's port."""
    import psutil

    port = int(client.url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return conn.pid
    raise AssertionError(f"no process listens on port {port}")
