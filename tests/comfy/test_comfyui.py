"""The pack inside a real ComfyUI: in-process node calls, and a server started from the vendored ComfyUI."""
from __future__ import annotations

import io
import shutil

import pytest
import torch
from PIL import Image

import erasekit
from erasekit.cli.comfy_server import ComfyError, ComfyServer

TINY_ATTN2_LAYERS = 7  # two levels with one res-block each: 2 down + 1 mid + 2x2 up


@pytest.fixture(scope="session")
def tiny_loaded(comfy, tiny_checkpoint):
    with torch.no_grad():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=True,
                                                                    output_clip=True)
    return model, clip, vae


def test_inspect_node_in_process(tiny_loaded):
    model, clip, _ = tiny_loaded
    node = erasekit.NODE_CLASS_MAPPINGS["EraseKitInspectModel"]()
    out = node.inspect(model, clip)
    report = out["result"][0]
    assert out["ui"]["text"] == [report]
    assert "family: Stable Diffusion 1.x" in report
    assert f"cross-attention layers: {TINY_ATTN2_LAYERS}" in report
    assert "clip_l (12 layers, width 768)" in report
    assert "AdvUnlearn" in report and "problem" not in report


def _inspect_prompt(ckpt_name: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "EraseKitInspectModel", "inputs": {"model": ["1", 0], "clip": ["1", 1]}},
    }


def _image_prompt(ckpt_name: str, seed: int = 0) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "erasekit_test"}},
    }


@pytest.mark.slow
def test_server_registers_every_node(comfy_server):
    info = comfy_server.client.object_info()
    for name, display in erasekit.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert info[name]["display_name"] == display
        assert info[name]["category"].startswith("EraseKit")


@pytest.mark.slow
def test_inspect_node_runs_in_a_server_prompt(comfy_server, tiny_checkpoint):
    entry = comfy_server.client.run(_inspect_prompt(tiny_checkpoint.name))
    (report,) = entry["outputs"]["2"]["text"]
    assert "family: Stable Diffusion 1.x" in report
    assert f"cross-attention layers: {TINY_ATTN2_LAYERS}" in report


@pytest.mark.slow
def test_harness_fetches_images(comfy_server, tiny_checkpoint):
    client = comfy_server.client
    (png,) = client.images(client.run(_image_prompt(tiny_checkpoint.name)))
    image = Image.open(io.BytesIO(png))
    assert image.size == (64, 64)


@pytest.mark.slow
def test_rejected_and_failing_prompts_raise_with_the_server_error(comfy_server, tiny_checkpoint):
    client = comfy_server.client
    with pytest.raises(ComfyError, match="ckpt_name"):
        client.run(_inspect_prompt("no-such-checkpoint.safetensors"))
    # A file that passes validation (it is listed) but fails while the prompt executes.
    (comfy_server.models_dir / "checkpoints" / "corrupt.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ComfyError, match="failed"):
        client.run(_inspect_prompt("corrupt.safetensors"))


@pytest.mark.slow
def test_a_pack_import_failure_fails_the_start(tmp_path):
    pack = tmp_path / "pack"
    shutil.copytree(erasekit.__path__[0], pack, ignore=shutil.ignore_patterns(".venv", ".git", "artifacts", "tests"))
    (pack / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    server = ComfyServer(workdir=tmp_path / "server", pack_dir=pack)
    with pytest.raises(ComfyError, match="broken on purpose"):
        server.start()
    server.stop()


def _erased_prompt(ckpt_name: str, untouched: bool, erased: bool, fresh: int = 0) -> dict:
    """One checkpoint loader feeding an untouched branch and/or a branch through the erase node (same seed).

    `fresh` shifts the branch node ids so that ComfyUI's cache cannot answer them: they execute again.
    """
    prompt = {k: v for k, v in _image_prompt(ckpt_name).items() if k in ("1", "2", "3", "4")}
    branches = []
    if untouched:
        branches.append((str(10 + fresh), ["1", 0]))
    if erased:
        prompt[str(20 + fresh)] = {"class_type": "EraseKitEraseConcepts", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "method": "uce", "concepts": "red circle", "guide": "",
            "preserve": "", "strength": 1.0}}
        branches.append((str(30 + fresh), [str(20 + fresh), 0]))
    for node, model in branches:
        prompt[node] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 7,
            "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
        prompt[str(int(node) + 1)] = {"class_type": "VAEDecode", "inputs": {"samples": [node, 0], "vae": ["1", 2]}}
        prompt[str(int(node) + 2)] = {"class_type": "SaveImage", "inputs": {
            "images": [str(int(node) + 1), 0], "filename_prefix": f"branch{node}"}}
    return prompt


def _pixels(client, entry) -> dict[str, bytes]:
    """Decoded pixels per SaveImage node (PNG bytes differ by the embedded prompt, pixels must not)."""
    out = {}
    for node, result in entry["outputs"].items():
        (png,) = client.images({"outputs": {node: result}})
        out[node] = Image.open(io.BytesIO(png)).tobytes()
    return out


@pytest.mark.slow
def test_erased_branch_leaves_the_untouched_branch_bit_identical(comfy_server, tiny_checkpoint):
    client = comfy_server.client
    name = tiny_checkpoint.name
    baseline = _pixels(client, client.run(_erased_prompt(name, untouched=True, erased=False)))["12"]
    both = _pixels(client, client.run(_erased_prompt(name, untouched=True, erased=True)))
    assert both["12"] == baseline
    assert both["32"] != baseline
    # The other order: the erased model is sampled first (its patches then sit in the shared module), and the
    # untouched graph executes after it; fresh node ids make both execute rather than come from the cache.
    erased_first = _pixels(client, client.run(_erased_prompt(name, untouched=False, erased=True, fresh=100)))
    assert erased_first["132"] == both["32"]
    assert _pixels(client, client.run(_erased_prompt(name, untouched=True, erased=False, fresh=200)))["212"] == baseline
