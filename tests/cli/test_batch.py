"""Batch generation: prompt lists (text, I2P-style CSV), the Prompt List node, `erasekit batch` on the shapes world
in-process and on real ComfyUI servers (sharded, killed, resumed)."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import started_server
from PIL import Image

import erasekit
from erasekit.cli import batch
from erasekit.cli.batch import BatchError, Workflow
from erasekit.cli.comfy_server import ComfyClient
from erasekit.erasers.io.prompt_lists import (
    PromptItem,
    PromptListError,
    parse_csv,
    parse_text,
    read_prompt_file,
    select,
)

NODE = "EraseKitPromptList"
I2P_HEADER = "prompt,categories,hard,inappropriate_percentage,evaluation_seed,evaluation_guidance,sd_image_width\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# --- prompt lists -------------------------------------------------------------------------------------------------


def test_text_lists_skip_blank_lines_and_seed_by_index():
    items = parse_text("a red circle\n\n  a blue square  \n", seed=10)
    assert items == [PromptItem(0, "a red circle", 10), PromptItem(1, "a blue square", 11)]


def test_i2p_csv_rows_keep_their_seed_guidance_and_categories(tmp_path):
    path = _write(tmp_path / "i2p.csv", "\ufeff" + I2P_HEADER +  # a spreadsheet's byte-order mark
                  'a nude figure,sexual,1,80.5,2918,7.5,512\n'
                  '"a quoted, comma prompt",,0,1.0,,,512\n'
                  'line with a float seed,violence,0,0,1234.0,,512\n\n'
                  ',hate,0,0,18446744073709551615,,512\n')
    items = read_prompt_file(path, seed=100)
    assert [(i.index, i.prompt, i.seed, i.guidance, i.categories) for i in items] == [
        (0, "a nude figure", 2918, 7.5, "sexual"),
        (1, "a quoted, comma prompt", 101, None, None),  # no seed in the row: seed + its index
        (2, "line with a float seed", 1234, None, "violence"),
        (3, "", 2**64 - 1, None, "hate"),  # an empty prompt is a row (the unconditional image)
    ]
    assert [i.index for i in select(items, 1, 2)] == [1, 2] and [i.index for i in select(items, 2)] == [2, 3]
    raw = parse_csv("Prompt,sd_seed,sd_guidance_scale\nx,5,3\n")  # I2P's own release names, any case
    assert (raw[0].prompt, raw[0].seed, raw[0].guidance) == ("x", 5, 3.0)


@pytest.mark.parametrize("text, message", [
    ("", r"empty\.csv is empty: write a header row with a 'prompt' column"),
    ("caption,seed\na cat,1\n", r"has no 'prompt' column \(its columns: 'caption', 'seed'\); name the column .*"
                                r"or use a \.txt file"),
    ("prompt,evaluation_seed\n", "has a header row but no prompts"),
    ("prompt,evaluation_seed\nok,1\nbad,12a\n", r"row 2 \(line 3\): evaluation_seed '12a' is not a whole number "
                                                r"from 0 to 18446744073709551615"),
    ("prompt,evaluation_seed\nneg,-3\n", r"row 1 \(line 2\): evaluation_seed '-3'"),
    ("prompt,evaluation_guidance\nx,high\n", r"row 1 \(line 2\): evaluation_guidance 'high' is not a guidance"),
])
def test_csv_errors_say_where_and_how_to_fix(tmp_path, text, message):
    path = _write(tmp_path / "empty.csv", text)
    with pytest.raises(PromptListError, match=message):
        read_prompt_file(path)


def test_file_and_selection_errors(tmp_path):
    with pytest.raises(PromptListError, match=r"\.txt is empty: write one prompt per line"):
        read_prompt_file(_write(tmp_path / "blank.txt", "\n  \n"))
    with pytest.raises(PromptListError, match="no prompt file"):
        read_prompt_file(tmp_path / "missing.csv")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(PromptListError, match="is not UTF-8 text"):
        read_prompt_file(tmp_path / "latin1.txt")
    with pytest.raises(PromptListError, match=r"start 2 is past the last prompt: the list has 2"):
        select(parse_text("a\nb"), start=2)


# --- the Prompt List node, in-process ComfyUI ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(comfy, tiny_checkpoint):
    with torch.no_grad():
        _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=False,
                                                              output_clip=True)
    return clip


def _build(clip, **overrides):
    inputs = dict(prompts="", file="", negative="blurry", seed=5, start=0, count=0, width=64, height=48)
    with torch.inference_mode():
        return erasekit.NODE_CLASS_MAPPINGS[NODE]().build(clip, **{**inputs, **overrides})


def test_the_node_batches_what_cliptextencode_makes_per_prompt(clip, tmp_path, monkeypatch):
    import comfy.sample
    import folder_paths

    import nodes

    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path))  # the node reads its input folder only

    long = " ".join(["a red circle on a striped background"] * 12)  # over 77 tokens: two chunks
    prompts = ["a red circle", long, "a blue square"]
    path = _write(tmp_path / "list.csv", "prompt,evaluation_seed\n" + "".join(f'"{p}",{s}\n'
                                                                          for p, s in zip(prompts, ("", 42, ""))))
    positive, negative, latent, noise, texts = _build(clip, file=path.name, start=1)
    with torch.inference_mode():
        alone = [nodes.CLIPTextEncode().encode(clip, p)[0][0] for p in prompts[1:]]
        (neg,) = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    assert texts == prompts[1:]
    (cond, extras), = positive
    assert alone[0][0].shape[1] == 154 and alone[1][0].shape[1] == 77
    assert cond.shape == (2, 154, 768)
    assert torch.equal(cond[0], alone[0][0][0])
    assert torch.equal(cond[1], alone[1][0][0].repeat(2, 1))  # the short prompt repeated, as ComfyUI batches it
    assert torch.equal(extras["pooled_output"], torch.cat([a[1]["pooled_output"] for a in alone]))
    (neg_cond, neg_extras), = negative
    assert torch.equal(neg_cond, neg[0].repeat(2, 1, 1))
    assert torch.equal(neg_extras["pooled_output"], neg[1]["pooled_output"].repeat(2, 1))
    assert latent["samples"].shape == (2, 4, 6, 8) and not latent["samples"].any()
    assert latent["batch_index"] == [1, 2]  # KSampler: row r takes the r-th noise of its seed
    # SamplerCustomAdvanced's noise: each row as KSampler draws it for a batch of one with the row's own seed
    # (row 1: its evaluation_seed 42; row 2: none, so seed 5 + 2).
    assert noise.seeds == [42, 7] and noise.seed == 42
    drawn = noise.generate_noise(latent)
    for row, seed in enumerate((42, 7)):
        assert torch.equal(drawn[row:row + 1], comfy.sample.prepare_noise(latent["samples"][:1], seed))


def test_the_node_reads_typed_prompts_and_says_what_is_wrong(clip, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path))  # the node reads its input folder only
    positive, _, latent, noise, texts = _build(clip, prompts="a red circle\n\na blue square\n", count=1)
    assert texts == ["a red circle"] and positive[0][0].shape[0] == 1 and noise.seeds == [5]
    node = erasekit.NODE_CLASS_MAPPINGS[NODE]
    assert node.OUTPUT_IS_LIST == (False, False, False, False, True)
    with pytest.raises(PromptListError, match="not both"):
        _build(clip, prompts="x", file="list.csv")
    with pytest.raises(PromptListError, match="no prompts: type one per line"):
        _build(clip)
    with pytest.raises(PromptListError, match="has no 'prompt' column"):
        _build(clip, file=_write(tmp_path / "bad.csv", "text\nx\n").name)
    with pytest.raises(ValueError, match="noise has 1 seeds but the latent a batch of 2"):
        noise.generate_noise({"samples": torch.zeros(2, 4, 8, 8)})


# --- workflows and PNG metadata -------------------------------------------------------------------------------------


def _workflow(ckpt: str = "tiny.safetensors", steps: int = 1, erase: bool = True) -> dict:
    model = ["9", 0] if erase else ["1", 0]
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "placeholder", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 0,
            "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "erasekit_batch"}},
    }
    if erase:
        prompt["9"] = {"class_type": "EraseKitEraseConcepts", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "method": "uce", "concepts": "circle", "guide": "", "preserve": "",
            "strength": 1.0}}
    return prompt


# What /object_info says about the node types above (the fields batch reads).
INFO = {"CheckpointLoaderSimple": {"output": ["MODEL", "CLIP", "VAE"]}, "CLIPTextEncode": {"output": ["CONDITIONING"]},
        "EmptyLatentImage": {"output": ["LATENT"]}, "KSampler": {"output": ["LATENT"]},
        "VAEDecode": {"output": ["IMAGE"]}, "SaveImage": {"output": [], "output_node": True},
        "EraseKitEraseConcepts": {"output": ["MODEL", "ERASURE"]}, "EraseKitLoadErasure": {"output": ["MODEL"]},
        "EraseKitInspectModel": {"output": ["STRING"], "output_node": True}}


def test_workflow_rules_prompt_seed_guidance_and_erasures():
    workflow = Workflow(_workflow())
    assert workflow.text_nodes == ["2"] and workflow.seeds == [("5", "seed")]
    item = workflow.for_item(PromptItem(3, "a red circle", 99, 4.5))
    assert item["2"]["inputs"]["text"] == "a red circle" and item["3"]["inputs"]["text"] == ""
    assert item["5"]["inputs"]["seed"] == 99 and item["5"]["inputs"]["cfg"] == 4.5
    assert workflow.prompt["2"]["inputs"]["text"] == "placeholder"  # the loaded workflow is not changed
    assert workflow.for_item(PromptItem(0, "x", 1))["5"]["inputs"]["cfg"] == 7.0  # no guidance: the workflow's
    outputs = workflow.check(INFO, "http://server")
    assert outputs == ["7"]
    # An erasure no output depends on is not applied by ComfyUI, so it is not recorded.
    dangling = {**_workflow(), "20": {"class_type": "EraseKitLoadErasure", "inputs": {
        "model": ["1", 0], "erasure_name": "x.safetensors", "strength": 1.0}}}
    erasures = Workflow(dangling).erasures(INFO, outputs)
    assert erasures == [{"node": "9", "type": "EraseKitEraseConcepts", "inputs": {
        "method": "uce", "concepts": "circle", "guide": "", "preserve": "", "strength": 1.0}}]
    # Two samplers (SDXL's base and refiner, say) with their own positive encoders: both get the prompt.
    refined = _workflow()
    refined["13"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "placeholder", "clip": ["1", 1]}}
    refined["15"] = {"class_type": "KSampler", "inputs": {**refined["5"]["inputs"], "positive": ["13", 0]}}
    item = Workflow(refined).for_item(PromptItem(0, "a star", 8))
    assert [item[n]["inputs"]["text"] for n in ("2", "13")] == ["a star"] * 2
    assert [item[n]["inputs"]["seed"] for n in ("5", "15")] == [8, 8]
    # A node titled "prompt" wins over the sampler's positive input.
    titled = _workflow()
    titled["3"]["_meta"] = {"title": "Prompt"}
    assert Workflow(titled).text_nodes == ["3"]


def test_a_prompt_list_node_takes_each_prompt_as_a_batch_of_one():
    prompt = {k: v for k, v in _workflow().items() if k not in ("2", "3", "4")}
    prompt["2"] = {"class_type": NODE, "inputs": {
        "clip": ["1", 1], "prompts": "a\nb\nc", "file": "list.csv", "negative": "blurry", "seed": 7, "start": 2,
        "count": 5, "width": 64, "height": 48}}
    prompt["5"]["inputs"].update(positive=["2", 0], negative=["2", 1], latent_image=["2", 2])
    workflow = Workflow(prompt, "wf.json")
    assert workflow.text_nodes == ["2"] and sorted(workflow.seeds) == [("2", "seed"), ("5", "seed")]
    item = workflow.for_item(PromptItem(4, "a red circle", 99))
    assert item["2"]["inputs"] == {**prompt["2"]["inputs"], "prompts": "a red circle", "file": "", "seed": 99,
                                   "start": 0, "count": 0}
    assert item["5"]["inputs"]["seed"] == 99
    workflow.check_items(parse_text("a red circle\na blue square"))
    for bad in ("", "two\nlines"):
        with pytest.raises(BatchError, match=r"prompt 1 \(.*\) is empty or has a line break, which the EraseKit "
                                             r"Prompt List node in wf\.json cannot take"):
            workflow.check_items([PromptItem(0, "fine", 0), PromptItem(1, bad, 1)])
    Workflow(_workflow()).check_items([PromptItem(0, "", 0)])  # CLIPTextEncode takes any prompt


def test_workflow_errors_name_the_fix(tmp_path):
    with pytest.raises(BatchError, match=r"is a UI workflow .*Export \(API\)"):
        Workflow({"nodes": [], "links": [], "version": 0.4})
    with pytest.raises(BatchError, match="is not JSON"):
        Workflow.load(_write(tmp_path / "wf.json", "{"))
    with pytest.raises(BatchError, match="no workflow file"):
        Workflow.load(tmp_path / "missing.json")
    combined = _workflow()
    combined["8"] = {"class_type": "ConditioningCombine",
                     "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["3", 0]}}
    combined["5"]["inputs"]["positive"] = ["8", 0]
    with pytest.raises(BatchError, match=r"positive inputs come from node 8 \(ConditioningCombine\); .*rename the "
                                         r"prompt's text-encode node to 'prompt'"):
        Workflow(combined)
    seedless = _workflow()
    del seedless["5"]["inputs"]["seed"]
    with pytest.raises(BatchError, match="no sampler seed"):
        Workflow(seedless)
    workflow = Workflow({k: v for k, v in _workflow().items() if k != "7"}, "wf.json")
    with pytest.raises(BatchError, match=r"wf\.json has no output node \(Save Image or similar\)"):
        workflow.check(INFO, "http://server")
    with pytest.raises(BatchError, match=r"ComfyUI at http://server has no node type 'EraseKitEraseConcepts' "
                                         r"\(node 9 of wf\.json\): install .*custom_nodes"):
        workflow.check({k: v for k, v in INFO.items() if k != "EraseKitEraseConcepts"}, "http://server")


def test_unreachable_server_is_named(tmp_path, capsys):
    from erasekit.cli.comfy_server import _free_port
    from erasekit.cli.main import main

    wf = _write(tmp_path / "wf.json", json.dumps(_workflow()))
    prompts = _write(tmp_path / "p.txt", "a\nb\n")
    url = f"http://127.0.0.1:{_free_port()}"
    assert main(["batch", "--workflow", str(wf), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                 "--server", url]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot reach ComfyUI at {url} (" in err and "start ComfyUI there" in err and "fix --server" in err
    assert not (tmp_path / "out").exists()


def test_a_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "00000.png").write_bytes(b"someone else's image")
    with pytest.raises(BatchError, match="holds files but no manifest.jsonl, so it is not a batch's folder"):
        batch.Manifest(tmp_path, parse_text("a"), [])
    assert (tmp_path / "00000.png").read_bytes() == b"someone else's image"


def test_png_text_keeps_every_other_chunk():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", '{"1": {}}')
    png = io.BytesIO()
    Image.new("RGB", (4, 3), (10, 20, 30)).save(png, format="PNG", pnginfo=info)
    tagged = batch.add_png_text(png.getvalue(), batch.PNG_KEY, json.dumps([{"method": "uce"}]))
    image = Image.open(io.BytesIO(tagged))
    assert image.text == {batch.PNG_KEY: '[{"method": "uce"}]', "prompt": '{"1": {}}'}
    assert image.tobytes() == Image.open(png).tobytes()


# --- the diffusers backend (shapes world, in-process) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def world_files(tmp_path_factory) -> dict[str, Path]:
    """A UCE erasure of "circle" computed on the shipped shapes model, and a seeded membrane for "square"."""
    from erasekit.erasers import spm
    from erasekit.erasers.spm.hooks import membrane_targets
    from erasekit.shapes import methods
    from erasekit.shapes.model import ShapesPipeline
    from erasekit.testing.tiny_models import random_membranes

    folder = tmp_path_factory.mktemp("world")
    pipe = ShapesPipeline.load()
    methods.closed_form_erasure(pipe, "uce", "circle").save(folder / "uce-circle.safetensors")
    (membrane,) = random_membranes(membrane_targets(pipe), ["square"])
    spm.save_membrane(membrane, folder / "square.safetensors")
    return {"erasure": folder / "uce-circle.safetensors", "membrane": folder / "square.safetensors"}


def test_diffusers_backend_applies_erasures_and_resumes_after_a_kill(world_files, tmp_path, monkeypatch, capsys):
    from erasekit.cli.main import main

    prompts = _write(tmp_path / "p.txt", "a red circle\na blue square\na green star\na yellow circle\n"
                                         "a red square\na blue triangle\n")
    out = tmp_path / "out"
    args = ["batch", "--backend", "diffusers", "--prompts", str(prompts), "--out", str(out), "--seed", "3",
            "--steps", "4", "--erasure", str(world_files["erasure"]), "--membrane", str(world_files["membrane"])]
    save, calls = batch.Manifest.save, []

    def killed_at_the_fourth(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return save(self, *a, **k)

    monkeypatch.setattr(batch.Manifest, "save", killed_at_the_fourth)
    assert main(args) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    monkeypatch.undo()
    first = {r["index"]: r for r in _manifest(out)}
    assert sorted(first) == [0, 1, 2]
    kept = {name: (out / name).stat().st_mtime_ns for r in first.values() for name in r["files"]}
    # What a kill can leave besides: an image renamed into place before its manifest line, a temporary file and
    # a manifest line cut short.
    (out / "00003.png").write_bytes(b"an image whose manifest line was never written")
    (out / ".00004.png.999.tmp").write_bytes(b"half an image")
    with open(out / "manifest.jsonl", "a") as manifest:
        manifest.write('{"index": 4, "prompt": "a red sq')
    assert main(args) == 0
    assert "6/6 prompts done (3 now, 3 earlier)" in capsys.readouterr().out
    records = _manifest(out)
    assert [r["index"] for r in records] == list(range(6))
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(6)] + ["manifest.jsonl"]
    assert all((out / name).stat().st_mtime_ns == t for name, t in kept.items())  # finished files not rewritten
    erasures = [
        {"type": "erasure", "file": "uce-circle.safetensors", "method": "uce", "concepts": ["circle"], "strength": 1.0},
        {"type": "membrane", "file": "square.safetensors", "method": "spm", "concepts": ["square"], "strength": 1.0,
         "facilitated_transport": True}]
    for record in records:
        assert record["erasures"] == erasures and record["server"] == "in-process"
        assert record["seed"] == 3 + record["index"] and record["guidance"] is None
        image = Image.open(out / record["files"][0])
        assert image.size == (32, 32) and json.loads(image.text[batch.PNG_KEY]) == erasures
    # The erasures changed the images: the circle prompt without them draws something else.
    plain = batch.run_diffusers(read_prompt_file(prompts, 3)[:1], tmp_path / "plain", steps=4)
    assert plain.generated == 1
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "plain" / "00000.png")),
                              np.asarray(Image.open(out / "00000.png")))
    # Another batch in the same folder is refused, not mixed in.
    assert main([*args[:-4], "--seed", "4"]) == 2
    assert "this folder holds another batch" in capsys.readouterr().err
    assert main(args[:-2]) == 2
    assert "was generated with other erasures" in capsys.readouterr().err


# --- the diffusers backend on a diffusers model folder (tiny SD1.x / SDXL pipelines saved to disk) ------------------


def _tiny_pipeline(xl: bool = False):
    """A random StableDiffusion(XL)Pipeline of SD1.x (768-wide context) or SDXL (2048) structure, with the shapes
    tokenizer and a one-level VAE (64×64 images are 64×64 latents)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from erasekit.shapes.model import build_tokenizer

    tokenizer = build_tokenizer()

    def text_encoder(width: int, kind=CLIPTextModel):
        return kind(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=16,
                                   num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                   projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                            layers_per_block=1).eval()
        common = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2,
                      norm_num_groups=8)
        if not xl:
            unet = UNet2DConditionModel(**common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                        cross_attention_dim=768).eval()
            return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder(768), tokenizer=tokenizer, unet=unet,
                                           scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        unet = UNet2DConditionModel(**common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16).eval()
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder(768),
                                         text_encoder_2=text_encoder(1280, CLIPTextModelWithProjection),
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                         scheduler=EulerDiscreteScheduler(steps_offset=1))


def _save_folder(folder: Path, xl: bool) -> dict[str, Path]:
    """The pipeline saved as a diffusers folder, a UCE erasure of "circle" computed on it with its own text
    encoder(s), and a seeded SPM membrane for "square" on its UNet."""
    from erasekit.erasers import spm
    from erasekit.erasers.closed_form import recipes
    from erasekit.erasers.diffusers_adapter import unet_kv_weights
    from erasekit.erasers.spm.hooks import membrane_targets
    from erasekit.erasers.text import TransformersEncoder
    from erasekit.testing.tiny_models import random_membranes

    pipe = _tiny_pipeline(xl)
    pipe.save_pretrained(folder / "model")
    if xl:
        encoder = TransformersEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                      penultimate=True)
    else:
        encoder = TransformersEncoder([pipe.tokenizer], [pipe.text_encoder])
    kv = {k: v.detach() for k, v in unet_kv_weights(pipe).items()}
    family = "sdxl" if xl else "sd1"
    recipes.erase(kv, encoder, family, recipes.EraseOptions(method="uce", concepts=["circle"])).save(
        folder / "uce-circle.safetensors")
    (membrane,) = random_membranes(membrane_targets(pipe), ["square"])
    assert membrane.family == family
    spm.save_membrane(membrane, folder / "square.safetensors")
    return {"model": folder / "model", "erasure": folder / "uce-circle.safetensors",
            "membrane": folder / "square.safetensors"}


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory) -> dict[str, Path]:
    return _save_folder(tmp_path_factory.mktemp("sd"), xl=False)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_a_diffusers_folder_gets_the_erasures_and_each_image_depends_on_its_seed_only(sd_files, tmp_path, capsys):
    from erasekit.cli.main import main

    prompts = _write(tmp_path / "p.txt", "a red circle\na blue square\na green star\n")
    base = ["batch", "--backend", "diffusers", "--model", str(sd_files["model"]), "--prompts", str(prompts),
            "--seed", "5", "--steps", "2", "--width", "64", "--height", "64"]
    erased = ["--erasure", str(sd_files["erasure"]), "--membrane", str(sd_files["membrane"])]
    out = tmp_path / "out"
    assert main([*base, "--out", str(out), *erased]) == 0, capsys.readouterr().err
    assert "3/3 prompts done (3 now, 0 earlier)" in capsys.readouterr().out
    erasures = [
        {"type": "erasure", "file": "uce-circle.safetensors", "method": "uce", "concepts": ["circle"], "strength": 1.0},
        {"type": "membrane", "file": "square.safetensors", "method": "spm", "concepts": ["square"], "strength": 1.0,
         "facilitated_transport": True}]
    records = _manifest(out)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "manifest.jsonl"]
    for record in records:
        assert record["erasures"] == erasures and record["server"] == "in-process"
        assert record["seed"] == 5 + record["index"] and record["guidance"] is None
        assert (record["model"], record["steps"], record["width"], record["height"]) == ("model", 2, 64, 64)
        image = Image.open(out / record["files"][0])
        assert image.size == (64, 64) and json.loads(image.text[batch.PNG_KEY]) == erasures
    made = {i: _pixels(out / f"{i:05d}.png") for i in range(3)}
    assert not np.array_equal(made[0], made[1])

    # Resume: the image of a deleted file is made again alone, the same as when it was made with the others.
    (out / "00002.png").unlink()
    assert main([*base, "--out", str(out), *erased]) == 0
    assert "3/3 prompts done (1 now, 2 earlier)" in capsys.readouterr().out
    assert np.array_equal(_pixels(out / "00002.png"), made[2])
    # The middle prompt alone (--start 1 --count 1) in another folder: the same image again.
    assert main([*base, "--out", str(tmp_path / "one"), "--start", "1", "--count", "1", *erased]) == 0
    assert np.array_equal(_pixels(tmp_path / "one" / "00001.png"), made[1])

    # Without the erasures, and with the erasure alone, the circle prompt draws something else each time.
    assert main([*base, "--out", str(tmp_path / "plain"), "--count", "1"]) == 0
    assert main([*base, "--out", str(tmp_path / "uce"), "--count", "1", *erased[:2]]) == 0
    plain, uce = _pixels(tmp_path / "plain" / "00000.png"), _pixels(tmp_path / "uce" / "00000.png")
    assert not np.array_equal(plain, uce) and not np.array_equal(uce, made[0])
    assert _manifest(tmp_path / "plain")[0]["erasures"] == []
    # Other settings in the same folder are refused, not mixed in.
    capsys.readouterr()
    assert main([*base[:-4], "--steps", "3", "--width", "64", "--height", "64", "--out", str(out), *erased]) == 2
    assert "was generated with steps 2 (now 3)" in capsys.readouterr().err


def test_diffusers_folder_errors_name_both_families_and_what_model_must_be(sd_files, tmp_path, capsys):
    from erasekit.cli.main import main
    from erasekit.erasers.erasure import Erasure

    prompts = _write(tmp_path / "p.txt", "a red circle\n")
    base = ["batch", "--backend", "diffusers", "--prompts", str(prompts), "--out", str(tmp_path / "out")]
    xl_erasure = Erasure.load(sd_files["erasure"])
    xl_erasure.family = "sdxl"
    xl_erasure.save(tmp_path / "xl.safetensors")
    assert main([*base, "--model", str(sd_files["model"]), "--erasure", str(tmp_path / "xl.safetensors")]) == 2
    assert "made for the sdxl family and cannot apply to a sd1 model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*base, "--model", str(tmp_path / "empty")]) == 2
    assert "not a diffusers pipeline folder (model_index.json) nor a shapes-world model" in capsys.readouterr().err
    _write(tmp_path / "empty" / "model_index.json", '{"_class_name": "FluxPipeline"}')
    assert main([*base, "--model", str(tmp_path / "empty")]) == 2
    assert "holds a FluxPipeline" in capsys.readouterr().err
    assert main([*base, "--model", str(sd_files["model"]), "--width", "60"]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    assert main([*base, "--width", "64"]) == 2  # the shapes world: 32×32 only
    assert "the shapes world draws 32×32 images only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*base, "--workflow", "wf.json", "--negative", "x"]) == 2
    assert "--workflow: only for --backend comfyui" in capsys.readouterr().err
    assert main(["batch", "--negative", "blurry", *base[3:]]) == 2  # the comfyui backend
    assert "--negative: only for --backend diffusers" in capsys.readouterr().err


def test_an_sdxl_folder_takes_its_erasures(tmp_path, capsys):
    from erasekit.cli.main import main

    files = _save_folder(tmp_path, xl=True)
    prompts = _write(tmp_path / "p.txt", "a red circle\na blue square\n")
    base = ["batch", "--backend", "diffusers", "--model", str(files["model"]), "--prompts", str(prompts),
            "--steps", "2", "--width", "64", "--height", "64", "--negative", "a green star"]
    assert main([*base, "--out", str(tmp_path / "out"), "--erasure", str(files["erasure"]),
                 "--membrane", str(files["membrane"])]) == 0, capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    records = _manifest(tmp_path / "out")
    assert [r["files"] for r in records] == [["00000.png"], ["00001.png"]]
    assert records[0]["negative"] == "a green star" and len(records[0]["erasures"]) == 2
    assert Image.open(tmp_path / "out" / "00000.png").size == (64, 64)
    assert not np.array_equal(_pixels(tmp_path / "out" / "00000.png"), _pixels(tmp_path / "plain" / "00000.png"))


# --- real ComfyUI servers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_server(tmp_path_factory, tiny_checkpoint):
    with started_server(tmp_path_factory.mktemp("comfyui-second"), tiny_checkpoint) as server:
        yield server


def _finished(out: Path) -> list[dict]:
    """The manifest's complete lines (a kill can cut the last one short)."""
    path = out / "manifest.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


@pytest.mark.slow
def test_two_servers_a_kill_and_a_resume_give_every_image_once(comfy_server, second_server, tiny_checkpoint,
                                                                 tmp_path):
    """The acceptance run: 40 prompts shared by two servers, SIGKILL midway, the same command again."""
    rows = "".join(f'"a photo of thing number {i}",{1000 + i if i % 3 else ""}\n' for i in range(40))
    prompts = _write(tmp_path / "prompts.csv", "prompt,evaluation_seed\n" + rows)
    workflow = _write(tmp_path / "wf.json", json.dumps(_workflow(tiny_checkpoint.name)))
    out = tmp_path / "out"
    urls = [comfy_server.client.url, second_server.client.url]
    command = [sys.executable, "-m", "erasekit.cli.main", "batch", "--workflow", str(workflow), "--prompts",
               str(prompts), "--out", str(out), *(a for url in urls for a in ("--server", url))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while len(_finished(out)) < 8:
            assert process.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no 8 images within 600 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed = _finished(out)
    assert 8 <= len(killed) < 40
    kept = {name: (out / name).stat().st_mtime_ns for r in killed for name in r["files"]}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"40 prompts: {len(killed)} done earlier, {40 - len(killed)} to generate on 2 server(s)" in result.stdout
    records = _manifest(out)
    assert len(records) == 40 and sorted(r["index"] for r in records) == list(range(40))
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(40)] + ["manifest.jsonl"]
    assert all((out / name).stat().st_mtime_ns == t for name, t in kept.items())
    assert {r["server"] for r in records} == set(urls)  # both servers took prompts
    erasures = [{"node": "9", "type": "EraseKitEraseConcepts", "inputs": {
        "method": "uce", "concepts": "circle", "guide": "", "preserve": "", "strength": 1.0}}]
    for record in records:
        i = record["index"]
        assert record["seed"] == (1000 + i if i % 3 else i) and record["erasures"] == erasures
        image = Image.open(out / record["files"][0])
        assert image.size == (64, 64) and json.loads(image.text[batch.PNG_KEY]) == erasures
        ran = json.loads(image.text["prompt"])  # ComfyUI's own chunk: the workflow as this prompt ran it
        assert ran["2"]["inputs"]["text"] == f"a photo of thing number {i}"
        assert ran["5"]["inputs"]["seed"] == record["seed"]


class _Dying(ComfyClient):
    """A client whose server stops answering after `lives` prompts."""

    def __init__(self, url: str, lives: int):
        super().__init__(url)
        self.lives = lives

    def run(self, *args, **kwargs):
        if self.lives == 0:
            raise ConnectionRefusedError(111, "Connection refused")
        self.lives -= 1
        return super().run(*args, **kwargs)


@pytest.mark.slow
def test_a_server_dying_midway_stops_cleanly_and_others_take_over(comfy_server, tiny_checkpoint, tmp_path,
                                                                    monkeypatch, capsys):
    from erasekit.cli.main import main

    url = comfy_server.client.url
    other = url.replace("127.0.0.1", "localhost")  # the same server under another name
    workflow = _write(tmp_path / "wf.json", json.dumps(_workflow(tiny_checkpoint.name, erase=False)))
    prompts = _write(tmp_path / "p.txt", "".join(f"prompt {i}\n" for i in range(5)))
    out = tmp_path / "out"
    args = ["batch", "--workflow", str(workflow), "--prompts", str(prompts), "--out", str(out), "--server", other]
    monkeypatch.setattr(batch, "ComfyClient", lambda u: _Dying(u, 2))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"ComfyUI at {other} stopped answering" in err and "at prompt 2" in err
    assert "3 prompts not generated; fix the error above and rerun the same command" in err
    assert [r["index"] for r in _manifest(out)] == [0, 1]
    # Resumed with a second server; the first dies at once and its prompt goes to the other.
    summary = batch.run_comfy(Workflow.load(workflow), parse_text(prompts.read_text()), out,
                              [_Dying(other, 0), ComfyClient(url)])
    assert (summary.earlier, summary.generated, summary.missing) == (2, 3, 0)
    assert f"ComfyUI at {other} stopped answering" in summary.errors[0]
    assert sorted(r["index"] for r in _manifest(out)) == list(range(5))
    # A prompt the server rejects stops the whole batch with the server's reason.
    broken = Workflow(_workflow("no-such-checkpoint.safetensors", erase=False))
    summary = batch.run_comfy(broken, parse_text("x\ny"), tmp_path / "broken", [ComfyClient(url)])
    assert summary.generated == 0 and summary.missing == 2
    assert "prompt 0 failed on" in summary.errors[0] and "ckpt_name" in summary.errors[0]


@pytest.mark.slow
def test_the_prompt_list_node_in_a_server(comfy_server, tiny_checkpoint):
    prompt = {k: v for k, v in _workflow(tiny_checkpoint.name, erase=False).items() if k in ("1", "5", "6", "7")}
    prompt["2"] = {"class_type": NODE, "inputs": {
        "clip": ["1", 1], "prompts": "a red circle\na blue square\na green star", "file": "", "negative": "",
        "seed": 0, "start": 0, "count": 0, "width": 64, "height": 64}}
    prompt["5"]["inputs"].update(positive=["2", 0], negative=["2", 1], latent_image=["2", 2])
    images = comfy_server.client.images(comfy_server.client.run(prompt))
    pixels = [Image.open(io.BytesIO(png)).convert("RGB").tobytes() for png in images]
    assert len(pixels) == 3 and len(set(pixels)) == 3
