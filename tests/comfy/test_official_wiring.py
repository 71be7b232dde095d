"""Official releases through the user-facing paths: `erasekit convert`, ComfyUI's Load Erasure, diffusers attach."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import erasekit
from erasekit.cli.main import main
from erasekit.erasers.erasure import Erasure
from erasekit.erasers.families import UNetLayout
from erasekit.erasers.io.checkpoints import read_checkpoint, split_checkpoint, unet_ldm_to_diffusers


@pytest.fixture(scope="module")
def base_unet(tiny_checkpoint) -> dict[str, torch.Tensor]:
    """The tiny checkpoint's UNet in diffusers names, float32: what the official files were 'made from'."""
    unet = split_checkpoint(read_checkpoint(tiny_checkpoint)).unet
    return {k: v.float() for k, v in unet_ldm_to_diffusers(unet, UNetLayout((1, 1))).items()}


def _low_rank_kv_edit(base: dict, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A known K/V edit sharing one row space across layers, as closed-form edits do."""
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, 768, generator=g) / 768 ** 0.5
    return {k: 0.05 * torch.randn(v.shape[0], rank, generator=g) @ down for k, v in base.items()
            if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}


def test_convert_command_on_an_official_uce_2025_file(tmp_path, base_unet, tiny_checkpoint, capsys):
    delta = _low_rank_kv_edit(base_unet, 2, 0)
    official = tmp_path / "uce_test.safetensors"
    save_file({k: (base_unet[k] + d).contiguous() for k, d in delta.items()}, str(official))
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(official), "--base", str(tiny_checkpoint), "--out", str(out), "--concept", "x"]) == 0
    printed = capsys.readouterr().out
    assert "uce-2025" in printed
    erasure = Erasure.load(out)
    assert erasure.method == "uce-2025" and erasure.concepts == ["x"] and erasure.family == "sd1"
    for name, d in delta.items():
        got = erasure.layers[f"unet.{name}"]
        assert got.rank <= 2
        # fp16 base weights in the checkpoint: the official file was written from fp32, so allow that rounding.
        assert torch.allclose(got.materialize(), d, atol=2e-3 * d.abs().max().item() + 1e-3)


def test_load_erasure_node_converts_rece_and_trce_releases(comfy, tiny_checkpoint, base_unet, tmp_path):
    import folder_paths

    folder_paths.folder_names_and_paths["erasers"] = ([str(tmp_path)], {".safetensors"})
    with torch.no_grad():
        model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=False,
                                                               output_clip=False)
    kv = _low_rank_kv_edit(base_unet, 3, 1)
    rece = {k: (base_unet[k] + kv.get(k, 0)).clone() for k in base_unet}
    torch.save(rece, tmp_path / "nudity_ep2.pt")
    trce_dir = tmp_path / "trce"
    trce_dir.mkdir()
    stage2 = {k: 1e-2 * torch.randn_like(v) for k, v in base_unet.items() if ".attn1." in k}
    save_file({k: (base_unet[k] + kv.get(k, 0) + stage2.get(k, 0)).contiguous() for k in base_unet},
              str(trce_dir / "diffusion_pytorch_model.safetensors"))
    (trce_dir / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                      "cross_attention_dim": 768}))

    node = erasekit.NODE_CLASS_MAPPINGS["EraseKitLoadErasure"]
    listed = node.INPUT_TYPES()["required"]["erasure_name"][0]
    assert "nudity_ep2.pt" in listed and "trce/diffusion_pytorch_model.safetensors" in listed
    with torch.inference_mode():
        patched, erasure = node().load(model, "nudity_ep2.pt", 1.0)
        assert set(erasure.layers) == {f"unet.{k}" for k in kv}
        patched_trce, trce = node().load(model, "trce/diffusion_pytorch_model.safetensors", 1.0)
    assert {f"unet.{k}" for k in stage2} <= set(trce.layers)
    assert len(patched_trce.patches) - len(model.patches) == len(trce.layers)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias"
    expected = stage2["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"]
    assert torch.allclose(patched_trce.patches[key][-1][1][0], expected, atol=1e-3)
