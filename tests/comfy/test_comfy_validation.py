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
