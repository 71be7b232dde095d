"""`erasekit erase` and `erasekit apply` on checkpoint files, run in-process through `main(argv)`.

The end-to-end runs use the tiny SD1.5 checkpoint (the same file ComfyUI loads); error paths and diffusers folders
use a micro checkpoint written here: an SD1-shaped UNet reduced to its cross-attention K/V weights (LDM names,
layout (1, 1)) and a one-layer CLIP-L. The reference for every erasure is `recipes.erase` on the same K/V
weights with an independent encoder: transformers' CLIP on the file's text weights with ComfyUI's vocabulary files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from erasekit.cli.main import main
from erasekit.erasers.closed_form import recipes
from erasekit.erasers.erasure import Erasure, LayerDelta
from erasekit.erasers.families import UNetLayout
from erasekit.erasers.io.checkpoints import UNET_PREFIX, read_checkpoint, write_checkpoint
from erasekit.erasers.io.clip_names import file_state_dict, load_file_state_dict
from erasekit.erasers.text import TransformersEncoder

MICRO_LAYOUT = UNetLayout((1, 1))
# LDM attention blocks of layout (1, 1) and their query widths (kept small: the edit does not depend on them).
MICRO_BLOCKS = {"input_blocks.1.1": 8, "input_blocks.3.1": 16, "middle_block.1": 16, "output_blocks.0.1": 16,
                "output_blocks.1.1": 16, "output_blocks.2.1": 8, "output_blocks.3.1": 8}
KV = ("to_k", "to_v")


def _comfy_tokenizer_dir() -> Path:
    from erasekit.cli.comfy_server import locate_comfyui

    return Path(locate_comfyui()) / "comfy" / "sd1_tokenizer"


def _micro_unet(context: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    unet = {
        "input_blocks.1.0.in_layers.0.weight": torch.randn(8, generator=g),
        "input_blocks.2.0.op.weight": torch.randn(8, 8, 3, 3, generator=g),
        "input_blocks.3.0.in_layers.0.weight": torch.randn(16, generator=g),
    }
    for block, inner in MICRO_BLOCKS.items():
        attn = f"{block}.transformer_blocks.0"
        for name in KV:
            unet[f"{attn}.attn2.{name}.weight"] = torch.randn(inner, context, generator=g) / context ** 0.5
        unet[f"{attn}.attn2.to_q.weight"] = torch.randn(inner, inner, generator=g)
    return unet


def _clip_l(layers: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.testing.tiny_models import CLIP_L_TEXT_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(**{**CLIP_L_TEXT_CONFIG, "num_hidden_layers": layers}))
    return file_state_dict(model)


@pytest.fixture(scope="module")
def micro_parts():
    return {"unet": _micro_unet(768, seed=1), "clip_l": _clip_l()}


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory, micro_parts) -> Path:
    """An SD1-shaped micro checkpoint in float16 (bfloat16 VAE, int64 position_ids) with metadata."""
    state = {UNET_PREFIX + k: v.half() for k, v in micro_parts["unet"].items()}
    state.update({f"cond_stage_model.transformer.{k}": (v if k.endswith("position_ids") else v.half())
                  for k, v in micro_parts["clip_l"].items()})
    state["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3).bfloat16()
    path = tmp_path_factory.mktemp("micro") / "micro-sd1.safetensors"
    write_checkpoint(path, state, {"modelspec.title": "micro", "format": "pt"})
    return path


@pytest.fixture(scope="module")
def micro_diffusers(tmp_path_factory, micro_parts) -> Path:
    """The micro model as a diffusers folder: float32 and fp16-variant UNet files, text encoder, tokenizer."""
    from transformers import CLIPTextConfig

    from erasekit.testing.tiny_models import CLIP_L_TEXT_CONFIG

    root = tmp_path_factory.mktemp("micro-diffusers") / "pipeline"
    unet = {MICRO_LAYOUT.to_diffusers(k): v for k, v in micro_parts["unet"].items() if ".transformer_blocks." in k}
    unet = {k: v.half().float() for k, v in unet.items()}  # the same values as the float16 single file
    unet["conv_in.weight"] = torch.randn(8, 4, 3, 3)
    write_checkpoint(root / "unet" / "diffusion_pytorch_model.safetensors", unet)
    write_checkpoint(root / "unet" / "diffusion_pytorch_model.fp16.safetensors", {k: v.half() for k, v in unet.items()})
    (root / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768}))
    text = {k: v.half().float() for k, v in micro_parts["clip_l"].items() if not k.endswith("position_ids")}
    write_checkpoint(root / "text_encoder" / "model.safetensors", text)
    CLIPTextConfig(**{**CLIP_L_TEXT_CONFIG, "num_hidden_layers": 1}).to_json_file(root / "text_encoder" / "config.json")
    shutil.copytree(_comfy_tokenizer_dir(), root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "vae").mkdir()
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not read, only copied")
    return root


def reference_encoder(state: dict[str, torch.Tensor]) -> TransformersEncoder:
    """transformers' CLIPTextModel on the checkpoint's CLIP-L, ComfyUI's vocabulary files: independent of the CLI."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from erasekit.testing.tiny_models import CLIP_L_TEXT_CONFIG

    prefix = "cond_stage_model.transformer."
    text = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    layers = 1 + max(int(k.split(".")[3]) for k in text if k.startswith("text_model.encoder.layers."))
    model = CLIPTextModel(CLIPTextConfig(**{**CLIP_L_TEXT_CONFIG, "num_hidden_layers": layers}))
    load_file_state_dict(model, text, strict=False)
    return TransformersEncoder([CLIPTokenizer.from_pretrained(_comfy_tokenizer_dir())], [model.eval()])


def reference_kv(state: dict[str, torch.Tensor], layout: UNetLayout) -> dict[str, torch.Tensor]:
    return {layout.to_diffusers(k[len(UNET_PREFIX):]): v.float() for k, v in sorted(state.items())
            if k.startswith(UNET_PREFIX) and k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}


def assert_same_erasure(ours: Erasure, expected: Erasure, rtol: float = 1e-4) -> None:
    assert list(ours.layers) == list(expected.layers)
    for name, delta in ours.layers.items():
        ref = expected.layers[name].materialize()
        assert torch.allclose(delta.materialize(), ref, atol=rtol * ref.abs().max().item()), name


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tokenizer files converted from open_clip's BPE list go to a per-session folder, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


# ---------------------------------------------------------------------------------------------------------------
# erase: end to end on the tiny SD1.5 checkpoint


@pytest.mark.slow
def test_uce_on_the_tiny_checkpoint_equals_the_library(capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "e.safetensors"
    code, stdout, stderr = run(capsys, "erase", "--method", "uce", "--concept", "red circle", "--checkpoint",
                               tiny_checkpoint, "--out", out)
    assert code == 0, stderr
    assert "Stable Diffusion 1.x" in stdout and "14 layers edited, rank 1" in stdout and "wrote" in stdout
    erasure = Erasure.load(out)
    assert erasure.method == "uce" and erasure.family == "sd1" and erasure.concepts == ["red circle"]
    state = read_checkpoint(tiny_checkpoint)
    expected = recipes.erase(reference_kv(state, UNetLayout((1, 1))), reference_encoder(state), "sd1",
                                  recipes.EraseOptions(method="uce", concepts=["red circle"]))
    assert_same_erasure(erasure, expected)
    assert erasure.base_fingerprint == expected.base_fingerprint


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("rece", ["--epochs", "1"]), ("trce", ["--trce-prior-captions", "10"])])
def test_rece_and_trce_run_on_the_tiny_checkpoint(capsys, tmp_path, tiny_checkpoint, method, extra):
    out = tmp_path / f"{method}.safetensors"
    code, stdout, stderr = run(capsys, "erase", "--method", method, "--concept", "red circle", "--checkpoint",
                               tiny_checkpoint, "--out", out, *extra)
    assert code == 0, stderr
    erasure = Erasure.load(out)
    assert erasure.method == method and len(erasure.layers) == 14
    assert ("RECE epoch 1/1" in stdout) if method == "rece" else ("10 COCO captions" in stdout)
    assert all(torch.isfinite(d.materialize()).all() for d in erasure.layers.values())


# ---------------------------------------------------------------------------------------------------------------
# apply: merging into the tiny checkpoint


@pytest.fixture(scope="module")
def tiny_erasure(tmp_path_factory, tiny_checkpoint) -> Path:
    state = read_checkpoint(tiny_checkpoint)
    erasure = recipes.erase(reference_kv(state, UNetLayout((1, 1))), reference_encoder(state), "sd1",
                                 recipes.EraseOptions(method="uce", concepts=["red circle"],
                                                           preserve=["blue square"]))
    return erasure.save(tmp_path_factory.mktemp("erasures") / "tiny-uce.safetensors")


@pytest.mark.slow
def test_apply_merges_into_a_copy_with_everything_else_unchanged(capsys, tmp_path, tiny_checkpoint, tiny_erasure):
    from safetensors import safe_open

    out = tmp_path / "merged.safetensors"
    code, stdout, stderr = run(capsys, "apply", "--erasure", tiny_erasure, "--checkpoint", tiny_checkpoint,
                               "--out", out)
    assert code == 0, stderr
    assert "merged 14 layers at strength 1" in stdout and "warning" not in stderr
    with safe_open(str(tiny_checkpoint), "pt") as a, safe_open(str(out), "pt") as b:
        assert a.metadata() == b.metadata() and a.metadata()["erasekit.model"] == "tiny-sd15"
    before, after = read_checkpoint(tiny_checkpoint), read_checkpoint(out)
    assert before.keys() == after.keys()
    erasure = Erasure.load(tiny_erasure)
    layout = UNetLayout((1, 1))
    edited = {UNET_PREFIX + layout.to_ldm(name.removeprefix("unet.")): delta for name, delta in erasure.layers.items()}
    assert len(edited) == 14
    for key, original in before.items():
        assert after[key].dtype == original.dtype, key
        if key in edited:
            expected = (original.float() + edited[key].materialize()).to(original.dtype)
            assert torch.equal(after[key], expected), key
            assert not torch.equal(after[key], original), key
        else:
            assert torch.equal(after[key].view(torch.uint8), original.view(torch.uint8)), key


@pytest.mark.slow
def test_apply_refuses_another_family_and_warns_on_another_fine_tune(capsys, tmp_path, tiny_checkpoint, tiny_erasure):
    from erasekit.testing.tiny_models import SDXL_UNET_CONFIG, unet_cross_attention_shapes

    layers = {f"unet.{block}.{name}.weight": LayerDelta(up=torch.ones(inner, 1), down=torch.ones(1, context))
              for block, (inner, context) in unet_cross_attention_shapes(SDXL_UNET_CONFIG).items() for name in KV}
    sdxl = Erasure(layers=layers, method="uce", family="sdxl", concepts=["red circle"])
    sdxl_path = sdxl.save(tmp_path / "sdxl.safetensors")
    out = tmp_path / "merged.safetensors"
    code, _, stderr = run(capsys, "apply", "--erasure", sdxl_path, "--checkpoint", tiny_checkpoint, "--out", out)
    assert code == 2 and not out.exists()
    assert "error:" in stderr and "sdxl" in stderr and "sd1" in stderr

    erasure = Erasure.load(tiny_erasure)
    erasure.base_fingerprint = [v * 1.05 for v in erasure.base_fingerprint]
    other = erasure.save(tmp_path / "other-fine-tune.safetensors")
    code, _, stderr = run(capsys, "apply", "--erasure", other, "--checkpoint", tiny_checkpoint, "--out", out,
                          "--strength", "0.5")
    assert code == 0 and out.is_file()
    assert "warning: this erasure was computed on other sd1 weights" in stderr


def test_apply_refuses_to_overwrite_its_input(capsys, tmp_path, micro_checkpoint):
    erasure = _micro_erasure(tmp_path)
    copy = tmp_path / "model.safetensors"
    shutil.copy(micro_checkpoint, copy)
    before = copy.read_bytes()
    code, _, stderr = run(capsys, "apply", "--erasure", erasure, "--checkpoint", copy, "--out", copy)
    assert code == 2 and "is one of this command's inputs" in stderr
    assert copy.read_bytes() == before
    code, _, stderr = run(capsys, "apply", "--erasure", erasure, "--checkpoint", copy, "--out", tmp_path / "m.ckpt")
    assert code == 2 and ".safetensors" in stderr


def _micro_erasure(tmp_path: Path, scale: float = 0.01) -> Path:
    """An sd1 erasure of the micro model's shapes (random deltas, no fingerprint)."""
    g = torch.Generator().manual_seed(7)
    layers = {}
    for block, inner in MICRO_BLOCKS.items():
        for name in KV:
            path = MICRO_LAYOUT.to_diffusers(f"{block}.transformer_blocks.0.attn2.{name}.weight")
            layers[f"unet.{path}"] = LayerDelta(dense=scale * torch.randn(inner, 768, generator=g))
    return Erasure(layers=layers, method="uce", family="sd1", concepts=["x"]).save(tmp_path / "micro.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Micro checkpoint and diffusers folder


def test_erase_on_the_micro_checkpoint_equals_the_library(capsys, tmp_path, micro_checkpoint):
    out = tmp_path / "e.safetensors"
    code, stdout, stderr = run(capsys, "erase", "--method", "uce", "--concept", "red circle", "--concept", "dog",
                               "--guide", "", "--preserve", "cat", "--lam", "0.3", "--checkpoint", micro_checkpoint,
                               "--out", out)
    assert code == 0, stderr
    assert "14 layers edited, rank 2" in stdout
    state = read_checkpoint(micro_checkpoint)
    expected = recipes.erase(reference_kv(state, MICRO_LAYOUT), reference_encoder(state), "sd1",
                                  recipes.EraseOptions(concepts=["red circle", "dog"], guide=[""],
                                                            preserve=["cat"], lam=0.3))
    erasure = Erasure.load(out)
    assert_same_erasure(erasure, expected)
    assert erasure.params["lam"] == 0.3 and erasure.preserve == ["cat"]


def test_erase_and_apply_on_a_pickled_ckpt(capsys, tmp_path, micro_checkpoint):
    state = read_checkpoint(micro_checkpoint)
    ckpt = tmp_path / "micro.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, ckpt)
    outs = []
    for source in (micro_checkpoint, ckpt):
        outs.append(tmp_path / f"{source.suffix[1:]}.safetensors")
        code, _, stderr = run(capsys, "erase", "--method", "uce", "--concept", "dog", "--checkpoint", source,
                              "--out", outs[-1])
        assert code == 0, stderr
    assert_same_erasure(Erasure.load(outs[1]), Erasure.load(outs[0]), rtol=1e-6)
    merged = tmp_path / "merged.safetensors"
    code, _, stderr = run(capsys, "apply", "--erasure", outs[1], "--checkpoint", ckpt, "--out", merged)
    assert code == 0, stderr
    assert read_checkpoint(merged).keys() == state.keys()


def test_erase_on_a_diffusers_folder_equals_the_single_file(capsys, tmp_path, micro_checkpoint, micro_diffusers):
    from_file, from_folder = tmp_path / "file.safetensors", tmp_path / "folder.safetensors"
    for source, out in ((micro_checkpoint, from_file), (micro_diffusers, from_folder)):
        code, stdout, stderr = run(capsys, "erase", "--method", "uce", "--concept", "red circle", "--checkpoint",
                                   source, "--out", out)
        assert code == 0, stderr
    assert "diffusers pipeline folder" in stdout
    assert_same_erasure(Erasure.load(from_folder), Erasure.load(from_file), rtol=1e-5)


def test_apply_to_a_diffusers_folder_merges_every_unet_copy(capsys, tmp_path, micro_diffusers):
    erasure_path = _micro_erasure(tmp_path)
    out = tmp_path / "merged"
    code, stdout, stderr = run(capsys, "apply", "--erasure", erasure_path, "--checkpoint", micro_diffusers,
                               "--out", out, "--strength", "2")
    assert code == 0, stderr
    assert "2 weight file(s)" in stdout
    files = sorted(p.relative_to(micro_diffusers) for p in micro_diffusers.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    erasure = Erasure.load(erasure_path)
    unet_files = {Path("unet/diffusion_pytorch_model.safetensors"),
                  Path("unet/diffusion_pytorch_model.fp16.safetensors")}
    for rel in files:
        if rel not in unet_files:
            assert (out / rel).read_bytes() == (micro_diffusers / rel).read_bytes(), rel
            continue
        before, after = read_checkpoint(micro_diffusers / rel), read_checkpoint(out / rel)
        assert before.keys() == after.keys()
        for key, original in before.items():
            assert after[key].dtype == original.dtype
            delta = erasure.layers.get(f"unet.{key}")
            if delta is None:
                assert torch.equal(after[key], original), key
            else:
                assert torch.equal(after[key], (original.float() + 2 * delta.materialize()).to(original.dtype)), key
    code, _, stderr = run(capsys, "apply", "--erasure", erasure_path, "--checkpoint", micro_diffusers, "--out", out)
    assert code == 2 and "not an empty folder" in stderr
    code, _, stderr = run(capsys, "apply", "--erasure", erasure_path, "--checkpoint", micro_diffusers, "--out",
                          micro_diffusers / "sub")
    assert code == 2 and "input folder" in stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_erase_on_sd2_and_sdxl_layouts(capsys, tmp_path, family):
    """Single files with open_clip towers: the CLI finds the family, the towers and the context width."""
    from erasekit.testing.tiny_models import random_open_clip_tower

    width = {"sd2": 1024, "sdxl": 2048}[family]
    state = {UNET_PREFIX + k: v.half() for k, v in _micro_unet(width, seed=2).items()}
    if family == "sd2":
        state.update({f"cond_stage_model.model.{k}": v.half() for k, v in
                      random_open_clip_tower(1024, 2, seed=3).items()})
    else:
        state.update({f"conditioner.embedders.0.transformer.{k}": v.half() for k, v in _clip_l(1).items()
                      if not k.endswith("position_ids")})
        state.update({f"conditioner.embedders.1.model.{k}": v.half() for k, v in
                      random_open_clip_tower(1280, 2, seed=4).items()})
    path = write_checkpoint(tmp_path / f"micro-{family}.safetensors", state)
    del state
    out = tmp_path / "e.safetensors"
    code, stdout, stderr = run(capsys, "erase", "--method", "uce", "--concept", "red circle", "--checkpoint", path,
                               "--out", out)
    assert code == 0, stderr
    label = {"sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}[family]
    assert label in stdout
    erasure = Erasure.load(out)
    assert erasure.family == family and len(erasure.layers) == 14
    assert all(d.shape[1] == width for d in erasure.layers.values())


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_checkpoint(capsys, tmp_path):
    code, _, stderr = run(capsys, "erase", "--method", "uce", "--concept", "dog", "--checkpoint",
                          tmp_path / "nope.safetensors", "--out", tmp_path / "e.safetensors")
    assert code == 2 and "nope.safetensors does not exist" in stderr
    code, _, stderr = run(capsys, "apply", "--erasure", tmp_path / "nope.safetensors", "--checkpoint",
                          tmp_path / "x.safetensors", "--out", tmp_path / "m.safetensors")
    assert code == 2 and "no such erasure file" in stderr


def test_truncated_checkpoint(capsys, tmp_path, micro_checkpoint):
    cut = tmp_path / "cut.safetensors"
    data = micro_checkpoint.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    code, _, stderr = run(capsys, "erase", "--method", "uce", "--concept", "dog", "--checkpoint", cut,
                          "--out", tmp_path / "e.safetensors")
    assert code == 2 and "cut.safetensors is not a complete safetensors file" in stderr and "truncated" in stderr
    code, _, stderr = run(capsys, "apply", "--erasure", _micro_erasure(tmp_path), "--checkpoint", cut,
                          "--out", tmp_path / "m.safetensors")
    assert code == 2 and "not a complete safetensors file" in stderr


def test_a_file_without_cross_attention(capsys, tmp_path):
    path = write_checkpoint(tmp_path / "vae.safetensors", {"first_stage_model.decoder.conv_in.weight": torch.zeros(2)})
    code, _, stderr = run(capsys, "erase", "--method", "uce", "--concept", "dog", "--checkpoint", path,
                          "--out", tmp_path / "e.safetensors")
    assert code == 2 and "has no UNet" in stderr
    path = write_checkpoint(tmp_path / "unet.safetensors", {
        UNET_PREFIX + "input_blocks.1.0.in_layers.0.weight": torch.zeros(2)})
    code, _, stderr = run(capsys, "erase", "--method", "uce", "--concept", "dog", "--checkpoint", path,
                          "--out", tmp_path / "e.safetensors")
    assert code == 2 and "no cross-attention" in stderr


@pytest.mark.parametrize("argv,message", [
    (["--concept", " "], "no concept to erase"),
    (["--concept", "dog", "--lam", "0"], "argument --lam: expected a number in (0, 100], found '0'"),
    (["--concept", "dog", "--lam", "-1"], "argument --lam: expected a number in (0, 100], found '-1'"),
    (["--concept", "dog", "--guide", "a", "--guide", "b"], "2 guide concepts for 1 erased concepts"),
    (["--concept", "dog", "--trce-prior-captions", "0"], "argument --trce-prior-captions: expected a number in [1, "
                                                         "2000], found 0"),
])
def test_option_errors_come_before_reading_the_model(capsys, tmp_path, argv, message):
    method = "trce" if "--trce-prior-captions" in argv else "uce"
    code, _, stderr = run(capsys, "erase", "--method", method, *argv, "--checkpoint", tmp_path / "nope.safetensors",
                          "--out", tmp_path / "e.safetensors")
    assert code == 2 and message in stderr and "nope" not in stderr


def test_unknown_method_is_an_argparse_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["erase", "--method", "esd", "--concept", "dog", "--checkpoint", "x.safetensors",
              "--out", "e.safetensors"])
    assert exc.value.code == 2
    assert "invalid choice: 'esd'" in capsys.readouterr().err


def test_a_long_concept_warns_with_the_cut_text(capsys, tmp_path, micro_checkpoint):
    concept = " ".join(["cat"] * 75) + " zebra giraffe"
    code, _, stderr = run(capsys, "erase", "--method", "uce", "--concept", concept, "--checkpoint", micro_checkpoint,
                          "--out", tmp_path / "e.safetensors")
    assert code == 0, stderr
    assert "warning:" in stderr and "'zebra giraffe'" in stderr and "77 tokens" in stderr
    assert stderr.count("zebra giraffe") == 1


def test_tokenizer_option_and_missing_open_clip(capsys, tmp_path, micro_checkpoint, monkeypatch):
    from erasekit.erasers.io import text_encoders

    monkeypatch.setattr(text_encoders, "open_clip_bpe_path", lambda: None)
    code, _, stderr = run(capsys, "erase", "--method", "uce", "--concept", "dog", "--checkpoint", micro_checkpoint,
                          "--out", tmp_path / "e.safetensors")
    assert code == 2 and "pip install open_clip_torch" in stderr and "--tokenizer DIR" in stderr
    code, _, stderr = run(capsys, "erase", "--method", "uce", "--concept", "dog", "--checkpoint", micro_checkpoint,
                          "--out", tmp_path / "e.safetensors", "--tokenizer", _comfy_tokenizer_dir())
    assert code == 0, stderr


def test_help_lists_the_new_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("selfcheck", "inspect", "erase", "apply"):
        assert command in out
