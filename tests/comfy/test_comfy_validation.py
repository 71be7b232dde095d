"""Erasures in ComfyUI (in-process, ComfyUI's own ModelPatcher): one that does not fit the MODEL is refused before any
patch, naming the layer and both shapes (finding 3 of issue #22: ComfyUI logged "WEIGHT NOT MERGED" and the image
was unchanged), and a bad erasure file is an ErasureFileError naming the file, whichever way the node reads it."""
from __future__ import annotations

import pytest
import torch

from erasekit.erasers.erasure import Erasure, ErasureFileError, ErasureMisfitError, LayerDelta


def _erasure(model, width: int = 768, rename: dict[str, str] | None = None) -> Erasure:
    """Rank-1 deltas on every attn2 to_k/to_v of the MODEL, with factors `width` wide, labelled sd1."""
    from erasekit.nodes.comfy_adapter import kv_weights

    g = torch.Generator().manual_seed(0)
    down = torch.randn(1, width, generator=g) * 0.01
    layers = {}
    for name, weight in kv_weights(model).items():
        name = (rename or {}).get(name, name)
        layers[f"unet.{name}"] = LayerDelta(up=torch.randn(weight.shape[0], 1, generator=g), down=down)
    return Erasure(layers=layers, method="uce", family="sd1", concepts=["red circle"])


def _patches(model) -> dict:
    return {key: list(value) for key, value in model.patches.items()}


def test_a_misfit_erasure_is_refused_naming_the_layer_and_both_shapes_before_any_patch(loaded):
    from erasekit.nodes.comfy_adapter import apply_erasure

    model, _ = loaded
    before = _patches(model)
    wide = _erasure(model, width=1024)  # 1024-wide factors, family metadata saying sd1
    with pytest.raises(ErasureMisfitError, match=r"attn2\.to_[kv]\.weight.*×1024 in the erasure but .*×768 in the "
                                                 r"model.*compute or load an erasure for this model"):
        apply_erasure(model, wide)
    assert _patches(model) == before


def test_an_erasure_with_a_layer_the_model_lacks_is_refused(loaded):
    from erasekit.nodes.comfy_adapter import apply_erasure, kv_weights

    model, _ = loaded
    first = next(iter(kv_weights(model)))
    ghost = first.replace("down_blocks.0", "down_blocks.7")
    with pytest.raises(ErasureMisfitError, match=r"down_blocks\.7.*which the model does not have"):
        apply_erasure(model, _erasure(model, rename={first: ghost}))
    text_layer = _erasure(model)
    text_layer.layers["text_encoder.text_model.final_layer_norm.weight"] = LayerDelta(dense=torch.zeros(768))
    with pytest.raises(ErasureMisfitError, match="text_encoder.*not a UNet layer"):
        apply_erasure(model, text_layer)


def test_an_erasure_that_fits_still_patches_every_layer(loaded):
    from erasekit.nodes.comfy_adapter import apply_erasure, kv_weights

    model, _ = loaded
    erasure = _erasure(model)
    clone = apply_erasure(model, erasure, 0.5)
    assert len(clone.patches) - len(model.patches) == len(kv_weights(model)) == len(erasure.layers)


def test_the_load_path_refuses_a_nan_erasure_file_naming_it(loaded, tmp_path):
    from erasekit.erasers.files import HASH_KEY, read_safetensors, write_safetensors
    from erasekit.nodes.closed_form import load_any_erasure

    model, _ = loaded
    path = _erasure(model).save(tmp_path / "e.safetensors")
    meta, tensors = read_safetensors(path)
    meta.pop(HASH_KEY)
    key = next(k for k in tensors if k.endswith(".up"))
    tensors[key][0, 0] = float("nan")
    write_safetensors(path, tensors, meta)  # a valid hash: only the value check can refuse it
    with pytest.raises(ErasureFileError, match=rf"e\.safetensors.*{key}.*NaN"):
        load_any_erasure(str(path), model)
    assert load_any_erasure(str(_erasure(model).save(tmp_path / "good.safetensors")), model).layers


# --- in a real server -------------------------------------------------------------------------------------------


def _server_prompt(ckpt_name: str, loader: dict | None, shift: int = 0) -> dict:
    """Checkpoint → (optional EraseKit loader node as "9") → KSampler → SaveImage; `shift` renames the sampler's
    nodes so that ComfyUI's cache cannot answer them."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    model = ["1", 0]
    if loader is not None:
        prompt["9"] = loader
        model = ["9", 0]
    sampler, decode, save = (str(50 + shift + i) for i in range(3))
    prompt[sampler] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 7,
        "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    prompt[decode] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": ["1", 2]}}
    prompt[save] = {"class_type": "SaveImage", "inputs": {"images": [decode, 0], "filename_prefix": f"v{shift}"}}
    return prompt


def _pixels(client, entry) -> list[bytes]:
    import io

    from PIL import Image

    return [Image.open(io.BytesIO(png)).tobytes() for png in client.images(entry)]


def _bad_files(folders, model) -> dict[str, tuple[dict, str]]:
    """Each bad case: (loader node, what the error must name)."""
    from safetensors.torch import save_file

    erasures, spm = folders
    good = _erasure(model)
    good.save(erasures / "good.safetensors")
    _erasure(model, width=1024).save(erasures / "wide.safetensors")
    data = (erasures / "good.safetensors").read_bytes()
    (erasures / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    changed = bytearray(data)
    changed[-3] ^= 0x40
    (erasures / "changed.safetensors").write_bytes(bytes(changed))
    lora = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{lora}.lora_down.weight": torch.ones(2, 768, dtype=torch.int8),
               f"{lora}.lora_up.weight": torch.ones(320, 2, dtype=torch.int8), f"{lora}.alpha": torch.tensor(1.0)},
              str(spm / "int8.safetensors"), {"prompts": "circle", "rank": "2"})

    def erasure(name, strength=1.0):
        return {"class_type": "EraseKitLoadErasure", "inputs": {"model": ["1", 0], "erasure_name": name,
                                                                 "strength": strength}}

    return {
        "misfit": (erasure("wide.safetensors"), r"wide\.safetensors|×1024 in the erasure"),
        "truncated": (erasure("truncated.safetensors"), r"truncated\.safetensors"),
        "changed": (erasure("changed.safetensors"), r"changed\.safetensors.*changed or damaged"),
        "int8 membrane": ({"class_type": "EraseKitLoadMembrane", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "membrane_name": "int8.safetensors", "strength": 1.0,
            "facilitated_transport": True, "combine": "additive"}},
            r"int8\.safetensors.*floating-point"),
        "nan strength": (erasure("good.safetensors", float("nan")), r"strength.*finite"),
        "outside the folder": (erasure("../../../../etc/passwd"), r"erasure_name"),
    }


@pytest.mark.slow
def test_a_real_server_names_each_bad_file_and_value_stays_up_and_draws_as_a_fresh_one(loaded, tiny_checkpoint,
                                                                                       tmp_path):
    from erasekit.cli.comfy_server import ComfyError, ComfyServer

    model, _ = loaded
    with ComfyServer(workdir=tmp_path) as client:
        models = tmp_path / "ComfyUI" / "models"
        (models / "checkpoints" / tiny_checkpoint.name).symlink_to(tiny_checkpoint)
        for folder in ("erasers", "spm"):
            (models / folder).mkdir(exist_ok=True)
        cases = _bad_files((models / "erasers", models / "spm"), model)
        good = {"class_type": "EraseKitLoadErasure", "inputs": {"model": ["1", 0], "erasure_name": "good.safetensors",
                                                                 "strength": 1.0}}
        fresh = _pixels(client, client.run(_server_prompt(tiny_checkpoint.name, good), timeout=300))
        unerased = _pixels(client, client.run(_server_prompt(tiny_checkpoint.name, None, shift=10), timeout=300))
        assert fresh != unerased  # the good erasure changes the image: the comparison below can fail
        for shift, (loader, names) in enumerate(cases.values(), start=20):
            with pytest.raises(ComfyError, match=names):
                client.run(_server_prompt(tiny_checkpoint.name, loader, shift), timeout=300)
        after = _pixels(client, client.run(_server_prompt(tiny_checkpoint.name, good, shift=90), timeout=300))
    assert after == fresh
