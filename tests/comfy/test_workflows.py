"""The shipped workflows: each UI file (workflows/ui/) is what its API twin (workflows/api/) says and what the real
ComfyUI's /object_info accepts, every API workflow runs end to end on the tiny checkpoint with the model files
`erasekit fixtures` writes, and example_workflows/ (ComfyUI's template folder) holds the same UI files."""
from __future__ import annotations

import copy
import filecmp
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import erasekit
from erasekit.cli import fixtures
from erasekit.cli.batch import Workflow, run_comfy
from erasekit.cli.comfy_server import PACK_FOLDER, ComfyError, locate_comfyui
from erasekit.cli.main import main
from erasekit.erasers.advunlearn.encoder import check_fits, load_advunlearn
from erasekit.erasers.erasure import Erasure
from erasekit.erasers.geom.negatives import LocationTokens
from erasekit.erasers.io import comfy_folders
from erasekit.erasers.io.checkpoints import read_checkpoint
from erasekit.erasers.io.prompt_lists import parse_text
from erasekit.erasers.io.text_encoders import checkpoint_text_towers
from erasekit.erasers.spm.membrane import load_membrane

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
EXAMPLES = ROOT / "example_workflows"
NAMES = sorted(path.stem for path in (WORKFLOWS / "ui").glob("*.json"))
UI_ONLY = {"Note", "MarkdownNote"}  # frontend-only nodes: absent from /object_info and from API prompts
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Node inputs that name a model file, and the models/ folder the file is in.
MODEL_FILE_INPUTS = {("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
                     ("EraseKitLoadMembrane", "membrane_name"): comfy_folders.SPM,
                     ("EraseKitLoadErasure", "erasure_name"): comfy_folders.ERASURES,
                     ("EraseKitLoadAdvUnlearn", "encoder_name"): comfy_folders.TEXT_ENCODERS,
                     ("EraseKitGeomErasingNegative", "embedding"): "embeddings"}


def _ui(name: str) -> dict:
    return json.loads((WORKFLOWS / "ui" / f"{name}.json").read_text())


def _api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text())


def _tokenizer_dir() -> Path:
    return locate_comfyui() / "comfy" / "sd1_tokenizer"  # CLIP's vocabulary, shipped with every ComfyUI


# --- the files ----------------------------------------------------------------------------------------------------


def test_every_ui_workflow_has_an_api_twin_and_the_top_folder_holds_none():
    assert NAMES and {f"{n}.api" for n in NAMES} == {p.stem for p in (WORKFLOWS / "api").glob("*.json")}
    # The newest ComfyUI lists <pack>/workflows/*.json as templates too: there they would show up twice, and the
    # API twins as templates that cannot load.
    assert not list(WORKFLOWS.glob("*.json")), "workflow files go to workflows/ui/ and workflows/api/"


def test_example_workflows_are_the_ui_workflows():
    examples = {path.name: path.read_bytes() for path in EXAMPLES.glob("*.json")}
    ui = {path.name: path.read_bytes() for path in (WORKFLOWS / "ui").glob("*.json")}
    drifted = sorted(name for name in examples.keys() | ui.keys() if examples.get(name) != ui.get(name))
    assert not drifted, (f"example_workflows/ differs from workflows/ui/ in {drifted}: run "
                         "`rm example_workflows/*.json && cp workflows/ui/*.json example_workflows/`")


def test_every_node_that_changes_the_images_has_a_workflow():
    """Only a node that just reports (a STRING, like Inspect Model) may be missing from the shipped workflows."""
    used = {node["class_type"] for name in NAMES for node in _api(name).values()}
    missing = sorted(kind for kind, cls in erasekit.NODE_CLASS_MAPPINGS.items()
                     if set(cls.RETURN_TYPES) != {"STRING"} and kind not in used)
    assert not missing, f"no workflow in workflows/ shows {missing}"


def test_fixtures_write_every_model_file_the_workflows_name():
    written = {("checkpoints", fixtures.CHECKPOINT), (comfy_folders.ERASURES, fixtures.ERASURE),
               *((comfy_folders.SPM, name) for name in fixtures.MEMBRANES),
               (comfy_folders.TEXT_ENCODERS, fixtures.ADVUNLEARN_ENCODER), ("embeddings", fixtures.LOCATION_TOKENS)}
    named = set()
    for name in NAMES:
        for node in _api(name).values():
            for key, value in node["inputs"].items():
                folder = MODEL_FILE_INPUTS.get((node["class_type"], key))
                assert folder or not str(value).endswith((".safetensors", ".ckpt", ".pt")), \
                    f"{name}: {node['class_type']}.{key} names a model file: add it to MODEL_FILE_INPUTS and fixtures"
                if folder:
                    named.add((folder, value))
    assert named == written


def test_fixtures_keep_the_files_that_exist(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "mine.safetensors"
    checkpoint.parent.mkdir()
    save_file({"weight": torch.zeros(1)}, str(checkpoint))  # the user's own checkpoint, not the tiny one
    others = [*(tmp_path / comfy_folders.SPM / name for name in fixtures.MEMBRANES),
              tmp_path / comfy_folders.ERASURES / fixtures.ERASURE,
              tmp_path / comfy_folders.TEXT_ENCODERS / fixtures.ADVUNLEARN_ENCODER,
              tmp_path / "embeddings" / fixtures.LOCATION_TOKENS]
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the user's own file")
    before = {path: path.read_bytes() for path in (checkpoint, *others)}
    lines = []
    assert fixtures.write_fixtures(tmp_path, "mine.safetensors", report=lines.append) == []
    assert {path: path.read_bytes() for path in before} == before
    assert [line for line in lines if line.startswith("kept ")] == [f"kept {path}: it exists (--force replaces it)"
                                                                    for path in before]
    assert "note: mine.safetensors is not the tiny checkpoint" in "\n".join(lines)


@pytest.mark.slow
def test_fixtures_command_writes_what_is_missing_and_force_replaces(capsys, tmp_path, tiny_checkpoint):
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "tiny.safetensors").symlink_to(tiny_checkpoint)
    user_membrane = models / comfy_folders.SPM / "snoopy_last.safetensors"
    user_membrane.parent.mkdir()
    user_membrane.write_bytes(b"the user's own file")
    args = ["fixtures", "--models-dir", str(models), "--checkpoint-name", "tiny.safetensors",
            "--tokenizer", str(_tokenizer_dir())]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"kept {models / 'checkpoints' / 'tiny.safetensors'}" in out and f"kept {user_membrane}" in out
    assert user_membrane.read_bytes() == b"the user's own file"
    assert load_membrane(models / comfy_folders.SPM / "mickey_last.safetensors").concepts == ["Mickey Mouse"]
    erasure = Erasure.load(models / comfy_folders.ERASURES / fixtures.ERASURE)
    assert (erasure.method, erasure.family, erasure.concepts, erasure.guide) == ("uce", "sd1", ["Van Gogh"], ["art"])
    # The AdvUnlearn folder: the checkpoint's own CLIP-L, changed where AdvUnlearn trains, embeddings kept.
    encoder_file = models / comfy_folders.TEXT_ENCODERS / fixtures.ADVUNLEARN_ENCODER
    encoder = load_advunlearn(encoder_file)
    assert load_advunlearn(encoder_file.parent).state_dict.keys() == encoder.state_dict.keys()  # config.json read
    own = checkpoint_text_towers(read_checkpoint(tiny_checkpoint), "sd1")["clip_l"]
    check_fits(encoder, {k: v.shape for k, v in own.items()}, "the tiny checkpoint's CLIP")
    changed = {k for k, v in own.items() if not torch.equal(v, encoder.state_dict[k])}
    assert changed and all(k.startswith(("text_model.encoder.", "text_model.final_layer_norm.")) for k in changed)
    tokens = LocationTokens.load(models / "embeddings" / fixtures.LOCATION_TOKENS)
    width = own["text_model.embeddings.token_embedding.weight"].shape[1]
    assert (tokens.concept, tokens.grid, tokens.cells, tokens.width, tokens.family) == \
        (fixtures.LOCATION_CONCEPT, 3, list(range(9)), width, "sd1")

    assert main([*args, "--force"]) == 0
    assert "kept" not in capsys.readouterr().out
    assert load_membrane(user_membrane).concepts == ["Snoopy"]
    again = load_advunlearn(encoder_file).state_dict  # seeded: the same encoder again
    assert all(torch.equal(again[k], v) for k, v in encoder.state_dict.items())
    assert not (models / "checkpoints" / "tiny.safetensors").is_symlink()
    assert filecmp.cmp(models / "checkpoints" / "tiny.safetensors", tiny_checkpoint, shallow=False)


# --- against a real ComfyUI ---------------------------------------------------------------------------------------


def _inputs(spec: dict) -> list[tuple[str, list]]:
    """(name, [type, options?]) of a node's inputs in the order its widgets are made: required, then optional."""
    order = spec.get("input_order", {})  # newest ComfyUI; older ones keep INPUT_TYPES' order in the JSON
    return [(name, list(spec["input"][part][name]))
            for part in ("required", "optional") for name in order.get(part, spec["input"].get(part, {}))]


def _is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_seed_control(name: str, kind, options: dict) -> bool:
    """The frontends add a control_after_generate widget (its value in widgets_values too) to these INTs."""
    return kind == "INT" and (name in ("seed", "noise_seed") or bool(options.get("control_after_generate")))


def _ui_to_api(ui: dict, info: dict) -> dict:
    """The API prompt the frontends make of a UI workflow (File > Export (API)): widget values taken in input order,
    links resolved, frontend-only nodes left out."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in UI_ONLY:
            continue
        assert node["type"] in info, f"node {node['id']}: no node type {node['type']!r} in this ComfyUI"
        assert node["mode"] == 0, f"node {node['id']} is muted or bypassed"
        linked = {slot["name"]: links[slot["link"]] for slot in node["inputs"] if slot.get("link") is not None}
        values = iter(node["widgets_values"])
        inputs = {}
        for name, (kind, *rest) in _inputs(info[node["type"]]):
            if _is_widget(kind):
                value = next(values)  # a widget turned into a linked input keeps its value
                if _has_seed_control(name, kind, rest[0] if rest else {}):
                    next(values)
                inputs[name] = value
            if name in linked:
                _, source, slot, *_ = linked[name]
                inputs[name] = [str(source), slot]
        assert next(values, None) is None, f"node {node['id']} ({node['type']}) has more widget values than widgets"
        title = node.get("title", info[node["type"]]["display_name"])
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    return prompt


def _check_ui_links(ui: dict, info: dict) -> None:
    """Every link is recorded at both ends, with the type of the output it leaves."""
    nodes = {node["id"]: node for node in ui["nodes"]}
    for link_id, source, out_slot, target, in_slot, kind in ui["links"]:
        assert link_id in nodes[source]["outputs"][out_slot]["links"], f"link {link_id} is not on its source"
        assert nodes[target]["inputs"][in_slot]["link"] == link_id, f"link {link_id} is not on its target"
        assert kind == info[nodes[source]["type"]]["output"][out_slot], f"link {link_id} has the wrong type"
    assert ui["last_link_id"] >= max(link[0] for link in ui["links"])
    assert ui["last_node_id"] >= max(nodes)


def _check_value(where: str, value, kind, options: dict) -> None:
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options["options"]
        assert value in choices, f"{where}: {value!r} is not one of {choices}"
    elif kind in ("INT", "FLOAT"):
        number = int if kind == "INT" else (int, float)
        assert isinstance(value, number) and not isinstance(value, bool), f"{where}: {value!r} is not an {kind}"
        low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
        assert low <= value <= high, f"{where}: {value} is outside [{low}, {high}]"
    else:
        assert isinstance(value, {"STRING": str, "BOOLEAN": bool}[kind]), f"{where}: {value!r} is not a {kind}"


def _check_prompt(prompt: dict, info: dict) -> None:
    """What ComfyUI would accept: known nodes and inputs, every required input set or linked to an output of its
    type, widget values among the choices and within the ranges."""
    for node_id, node in prompt.items():
        spec = info[node["class_type"]]
        known = dict(_inputs(spec))
        assert set(node["inputs"]) <= set(known), f"node {node_id}: unknown inputs {set(node['inputs']) - set(known)}"
        assert set(spec["input"]["required"]) <= set(node["inputs"]), f"node {node_id}: a required input is missing"
        for name, value in node["inputs"].items():
            kind, *rest = known[name]
            where = f"node {node_id} ({node['class_type']}).{name}"
            if isinstance(value, list):
                source, slot = value
                outputs = info[prompt[source]["class_type"]]["output"]
                assert outputs[slot] == kind, f"{where}: linked to a {outputs[slot]} output, needs {kind}"
            else:
                _check_value(where, value, kind, rest[0] if rest else {})
    assert any(info[node["class_type"]]["output_node"] for node in prompt.values()), "no output node"


def _tiny_inputs(class_type: str, checkpoint: str) -> dict:
    """The inputs that put a workflow's node on the tiny checkpoint, sized for a CPU: 64×64 images, 2 steps."""
    if class_type == "CheckpointLoaderSimple":
        return {"ckpt_name": checkpoint}
    if class_type in ("EmptyLatentImage", "EraseKitPromptList"):
        return {"width": 64, "height": 64}
    if class_type == "KSampler":
        return {"steps": 2}
    return {}


def _for_the_tiny_checkpoint(prompt: dict, checkpoint: str) -> dict:
    """An API workflow on the tiny checkpoint (_tiny_inputs)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        node["inputs"].update(_tiny_inputs(node["class_type"], checkpoint))
    return prompt


def set_widget(node: dict, info: dict, name: str, value) -> None:
    """Set the widget value of input `name` in a UI workflow's node (its place in widgets_values)."""
    index = 0
    for input_name, (kind, *rest) in _inputs(info[node["type"]]):
        if not _is_widget(kind):
            continue
        if input_name == name:
            node["widgets_values"][index] = value
            return
        index += 1 + _has_seed_control(input_name, kind, rest[0] if rest else {})
    raise KeyError(f"{node['type']} has no widget {name!r}")


def ui_for_the_tiny_checkpoint(ui: dict, info: dict, checkpoint: str) -> dict:
    """A UI workflow on the tiny checkpoint: what _for_the_tiny_checkpoint makes of its API twin."""
    ui = copy.deepcopy(ui)
    for node in ui["nodes"]:
        for name, value in _tiny_inputs(node["type"], checkpoint).items():
            set_widget(node, info, name, value)
    return ui


@pytest.fixture(scope="module")
def server(comfy_server, tiny_checkpoint):
    """The test server with the workflows' model files in its models folder, and its /object_info."""
    fixtures.write_fixtures(comfy_server.models_dir, tiny_checkpoint.name, tokenizer_dir=_tokenizer_dir(),
                            report=lambda _: None)
    return comfy_server.client, comfy_server.client.object_info()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_its_api_twin_and_valid_in_comfyui(server, tiny_checkpoint, name):
    _, info = server
    ui, api = _ui(name), _api(name)
    assert ui["version"] == 0.4 and ui["groups"] is not None
    _check_ui_links(ui, info)
    assert _ui_to_api(ui, info) == api
    tiny = _for_the_tiny_checkpoint(api, tiny_checkpoint.name)
    _check_prompt(tiny, info)
    assert _ui_to_api(ui_for_the_tiny_checkpoint(ui, info, tiny_checkpoint.name), info) == tiny  # tests/test_browser


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_and_yields_images(server, tiny_checkpoint, name):
    client, _ = server
    prompt = _for_the_tiny_checkpoint(_api(name), tiny_checkpoint.name)
    images = [Image.open(io.BytesIO(png)) for png in client.images(client.run(prompt))]
    assert images and all(image.size == (64, 64) for image in images)
    if any(node["class_type"] == "ImageBatch" for node in prompt.values()):  # before / after, same seed
        assert len(images) == 2 and images[0].tobytes() != images[1].tobytes()
    lists = [node["inputs"]["prompts"] for node in prompt.values() if node["class_type"] == "EraseKitPromptList"]
    if lists:  # one image per prompt, each its own
        assert len(images) == len(parse_text(lists[0])) > 1
        assert len({image.tobytes() for image in images}) == len(images)


@pytest.mark.slow
def test_an_erasure_saved_by_one_workflow_loads_in_the_other(comfy_server, server, tiny_checkpoint):
    client, _ = server
    folder = comfy_server.models_dir / comfy_folders.ERASURES
    before = set(folder.rglob("*.safetensors"))
    save = _for_the_tiny_checkpoint(_api("save_erasure"), tiny_checkpoint.name)
    (saver,) = [node for node in save.values() if node["class_type"] == "EraseKitSaveErasure"]
    saver["inputs"]["filename_prefix"] += "_reused"  # a new input: ComfyUI runs the node again, not from its cache
    client.run(save)
    (saved,) = set(folder.rglob("*.safetensors")) - before
    assert Erasure.load(saved).concepts == ["Van Gogh"]
    prompt = _for_the_tiny_checkpoint(_api("load_erasure"), tiny_checkpoint.name)
    (loader,) = [node for node in prompt.values() if node["class_type"] == "EraseKitLoadErasure"]
    loader["inputs"]["erasure_name"] = saved.relative_to(folder).as_posix()
    assert client.images(client.run(prompt))


@pytest.mark.slow
def test_comfyui_lists_the_example_workflows_as_the_packs_templates(server):
    client, _ = server
    try:
        templates = client.get_json("/workflow_templates")
    except ComfyError as err:
        if "HTTP 404" not in str(err):
            raise
        pytest.skip("this ComfyUI has no workflow templates (the 2024 one has none)")
    assert sorted(templates[PACK_FOLDER]) == NAMES  # each once, and no API twin
    for name in NAMES:
        assert client.get_json(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json") == _ui(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_erasekit_batch_runs_the_api_workflow(server, tiny_checkpoint, tmp_path, name):
    """Every API workflow works with `erasekit batch`: each prompt of the list in its prompt node (a Prompt List
    node takes it as a batch of one), the prompt's seed in every seed; one PNG per saved image."""
    client, _ = server
    workflow = Workflow(_for_the_tiny_checkpoint(_api(name), tiny_checkpoint.name), name)
    items = parse_text("a red circle\na blue square", seed=7)
    summary = run_comfy(workflow, items, tmp_path, [client])
    assert (summary.generated, summary.missing, summary.errors) == (2, 0, [])
    per_prompt = 2 if any(node["class_type"] == "ImageBatch" for node in workflow.prompt.values()) else 1
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert sorted(len(record["files"]) for record in records) == [per_prompt] * 2
    for record in records:
        image = Image.open(tmp_path / record["files"][0])
        ran = json.loads(image.text["prompt"])  # ComfyUI's own chunk: the workflow as this prompt ran it
        assert [ran[n]["inputs"].get("text", ran[n]["inputs"].get("prompts")) for n in workflow.text_nodes] == \
            [record["prompt"]] * len(workflow.text_nodes)
        assert all(ran[n]["inputs"][key] == record["seed"] for n, key in workflow.seeds)
