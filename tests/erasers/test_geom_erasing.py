"""Geom-Erasing: location-token files, negative-prompt building and its errors, the ComfyUI node against
CLIPTextEncode (plain words, and learned tokens against ComfyUI's own `embedding:` loader), and training."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import erasekit
from erasekit.erasers.geom import negatives as geom
from erasekit.erasers.geom import train as gt
from erasekit.erasers.geom.negatives import GeomError, LocationTokens
from erasekit.shapes import data

NODE = "EraseKitGeomErasingNegative"


def _tokens(width: int = 8, grid: int = 3, seed: int = 0) -> LocationTokens:
    vectors = torch.randn(grid * grid, width, generator=torch.Generator().manual_seed(seed))
    return LocationTokens("stamp", grid, list(range(grid * grid)), vectors, "sd1")


def test_file_round_trip_and_subset(tmp_path):
    tokens = _tokens()
    tokens.save(tmp_path / "stamp.safetensors")
    loaded = LocationTokens.load(tmp_path / "stamp.safetensors")
    assert (loaded.concept, loaded.grid, loaded.cells, loaded.family) == ("stamp", 3, list(range(9)), "sd1")
    assert torch.equal(loaded.vectors, tokens.vectors)
    corners = loaded.subset("8, 0 2 6")
    corners.save(tmp_path / "corners.safetensors")
    again = LocationTokens.load(tmp_path / "corners.safetensors")
    assert again.cells == [0, 2, 6, 8] and torch.equal(again.vectors, tokens.vectors[[0, 2, 6, 8]])
    with pytest.raises(GeomError, match=r"no tokens for cells \[4\]"):
        again.select([4])


def test_load_refuses_other_files(tmp_path):
    save_file({"emb_params": torch.zeros(2, 8)}, str(tmp_path / "ti.safetensors"))
    with pytest.raises(GeomError, match="not a Geom-Erasing location-token file"):
        LocationTokens.load(tmp_path / "ti.safetensors")


def test_cells_and_boxes():
    assert geom.parse_cells("everywhere", 3) == list(range(9))
    assert geom.parse_cells("2, 0", 3) == [0, 2]
    with pytest.raises(GeomError, match=r"unknown grid cells \[9\].*0..8"):
        geom.parse_cells("0 9", 3)
    with pytest.raises(GeomError, match="cell numbers"):
        geom.parse_cells("top left", 3)
    # The shapes world's stamps sit in single corner cells of a 3x3 grid; a centred box covers 4 cells of 4x4.
    assert [geom.cells_of_box(data.stamp_box(c), data.SIZE, data.SIZE, 3) for c in range(4)] == [[0], [2], [6], [8]]
    assert geom.cells_of_box((8, 8, 24, 24), 32, 32, 4) == [5, 6, 9, 10]
    with pytest.raises(GeomError, match="not inside the 32x32 image"):
        geom.cells_of_box((30, 0, 34, 4), 32, 32, 3)


def test_plain_negative_text():
    assert [geom.cell_phrase(c, 3) for c in range(9)] == list(data.POSITIONS)
    assert geom.plain_negative("watermark", range(9), 3) == "watermark"
    assert geom.plain_negative("stamp", [0, 8], 3) == "stamp in the top left, stamp in the bottom right"
    assert geom.plain_negative("text", [0, 1], 6) == "text in the top left"  # both cells lie in the same third
    assert geom.append_negative("blurry, ", "qr code") == "blurry, qr code"
    assert geom.append_negative("", "qr code") == "qr code"
    with pytest.raises(GeomError, match="custom"):
        geom.concept_name("custom", " ")


def test_width_check():
    with pytest.raises(GeomError, match="8 wide but this text encoder embeds tokens 768 wide"):
        _tokens().check_width(768)


# ComfyUI node ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def clip(comfy, tiny_checkpoint, embeddings):
    with torch.no_grad():
        _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=False,
                                                              output_clip=True, embedding_directory=str(embeddings))
    return clip


@pytest.fixture
def node(clip, embeddings, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "embeddings", ([str(embeddings)], {".safetensors"}))
    return erasekit.NODE_CLASS_MAPPINGS[NODE]()


def _encode(clip, text: str) -> torch.Tensor:
    import nodes

    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0][0][0]


def _node(node, clip, **kw) -> torch.Tensor:
    args = dict(concept="stamp", custom_concept="", locations="everywhere", grid=3, embedding="none (plain words)",
                negative="")
    with torch.inference_mode():
        (conditioning,) = node.build(clip, **{**args, **kw})
    return conditioning[0][0]


def test_node_plain_words_equal_cliptextencode(node, clip):
    out = _node(node, clip, concept="custom", custom_concept="logo", locations="0, 8", negative="blurry")
    assert torch.equal(out, _encode(clip, "blurry, logo in the top left, logo in the bottom right"))


def test_node_learned_tokens_equal_comfyuis_embedding_loader(node, clip, embeddings):
    tokens = _tokens(width=768)
    tokens.save(embeddings / "stamp-geom.safetensors")
    tokens.subset([0, 2]).save(embeddings / "stamp-top.safetensors")  # ComfyUI reads the stored cells' vectors
    out = _node(node, clip, locations="2 0", embedding="stamp-geom.safetensors", negative="blurry")
    reference = _encode(clip, "blurry, stamp embedding:stamp-top")
    assert torch.equal(out, reference)
    assert not torch.equal(out, _encode(clip, "blurry, stamp"))


def test_node_errors(node, clip, embeddings):
    _tokens(width=8).save(embeddings / "narrow.safetensors")
    with pytest.raises(GeomError, match="8 wide but this CLIP"):
        _node(node, clip, embedding="narrow.safetensors")
    with pytest.raises(GeomError, match="3x3 grid; set grid to 3"):
        _node(node, clip, embedding="narrow.safetensors", grid=4)
    with pytest.raises(GeomError, match="not 'watermark'"):
        _node(node, clip, embedding="narrow.safetensors", concept="watermark")
    with pytest.raises(GeomError, match="unknown grid cells"):
        _node(node, clip, locations="12")


# Training ----------------------------------------------------------------------------------------------------------

def test_weight_map_is_the_papers():
    w = gt.weight_map([0], 3, 6, 6, alpha=2.0)
    inside, outside = 9 / (1 + 2 * 8), 2 * 9 / (1 + 2 * 8)
    assert torch.allclose(w[:2, :2], torch.tensor(inside)) and torch.allclose(w[4:, 4:], torch.tensor(outside))
    assert torch.isclose(w.sum() / 4, torch.tensor(9.0))  # 4 pixels per cell: the weights sum to T over cells


def test_training_lowers_the_loss_of_stamped_captions():
    from diffusers import DDPMScheduler

    from erasekit.shapes.model import ShapesPipeline

    pipe = ShapesPipeline.load()
    images, captions, specs = data.batch(7, 24, dropout=0.0)
    boxes = [[data.stamp_box(s.stamp)] if s.stamp is not None else [] for s in specs]
    config = gt.GeomTrainConfig(steps=25, batch_size=8, lr=0.05)
    tokens = gt.train_location_tokens(pipe, torch.from_numpy(images), captions, boxes, "stamp", config)
    assert all(p.requires_grad for p in pipe.unet.parameters())  # the caller's flags are restored

    stamped = [i for i, b in enumerate(boxes) if b]
    x0 = torch.from_numpy(images[stamped])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(50, 950, len(stamped)).long()
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    vocab = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    cells = [geom.cells_of_box(boxes[i][0], data.SIZE, data.SIZE, 3) for i in stamped]
    ids = torch.tensor([gt._caption_ids(pipe.tokenizer, captions[i], "stamp", cs, {c: vocab + c for c in range(9)})
                        for i, cs in zip(stamped, cells)])

    def loss(vectors):
        with torch.no_grad():
            context = gt.encode_with_tokens(pipe.text_encoder, ids, vectors)
            eps = pipe.unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
        return torch.nn.functional.mse_loss(eps, noise).item()

    table = pipe.text_encoder.get_input_embeddings().weight
    start = table[pipe.tokenizer("stamp", add_special_tokens=False)["input_ids"]].mean(0).repeat(9, 1)
    assert loss(tokens.vectors) < loss(start)
    # The diffusers-side negative: without cells it is the plain encoding; with them the tokens follow the text.
    assert torch.allclose(gt.encode_negative(pipe, "stamp", tokens, []), pipe.encode(["stamp"]), atol=1e-6)
    assert not torch.allclose(gt.encode_negative(pipe, "stamp", tokens, [0]), pipe.encode(["stamp"]), atol=1e-3)


def test_cli_trains_from_a_captioned_folder_and_reports_bad_boxes(tmp_path, capsys):
    import json

    from PIL import Image

    from erasekit.cli.main import main

    images, captions, _ = data.batch(3, 6, dropout=0.0)
    rows = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(((image.transpose(1, 2, 0) + 1) * 127.5).round().astype("uint8")).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": caption, "boxes": [list(data.stamp_box(i % 4))]})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "stamp.safetensors"
    assert main(["train-geom", "--data", str(tmp_path), "--out", str(out), "--steps", "2", "--batch-size", "2"]) == 0
    written = LocationTokens.load(out)
    assert written.cells == list(range(9)) and written.extra["alpha"] == str(gt.GeomTrainConfig().alpha)

    rows[0]["boxes"] = [[28, 28, 40, 40]]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["train-geom", "--data", str(tmp_path), "--out", str(out), "--steps", "2"]) == 2
    assert "not inside the 32x32 image" in capsys.readouterr().err
    assert main(["train-geom", "--data", str(tmp_path), "--out", str(out), "--alpha", "0"]) == 2
    assert "alpha must be > 0" in capsys.readouterr().err


# Data-removal setting ----------------------------------------------------------------------------------------------

def _data_config(**kw) -> gt.GeomTrainConfig:
    return gt.GeomTrainConfig(**{"setting": "data", "steps": 3, "batch_size": 4, "min_snr_gamma": 5.0, **kw})


def _fixed_loss(unet, pipe, vectors, prep, repeats: int = 4) -> float:
    """The training objective (geometry weights, min-SNR-5) over `prep`'s captions at fixed noise and timesteps."""
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    x0, ids, weights = (v.repeat(repeats, *[1] * (v.ndim - 1)) for v in (prep.images, prep.ids, prep.weights))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.randint(1000, (len(x0),), generator=torch.Generator().manual_seed(2))
    snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
    with torch.no_grad():
        context = gt.encode_with_tokens(pipe.text_encoder, ids, vectors)
        eps = unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
    return ((weights * (eps - noise) ** 2).mean((1, 2, 3)) * snr.clamp(max=5) / snr).mean().item()


def test_data_setting_fine_tunes_a_copy_of_the_unet_and_lowers_the_loss():
    from erasekit.shapes.model import ShapesPipeline

    pipe = ShapesPipeline.load()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    images, captions, boxes = data.geom_training_set(32, 5, dropout=0.0)
    losses = []
    # A small learning rate: at the shapes default (2e-4 and more) 40 noisy batch-16 steps first raise the loss.
    config = _data_config(steps=40, batch_size=16, unet_lr=5e-5, caption_dropout=0.0)
    tokens, unet = gt.train_data_removal(pipe, images, captions, boxes, "stamp", config,
                                         progress=lambda step, loss: losses.append(loss))
    assert len(losses) == 40 and unet is not pipe.unet and not unet.training
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())  # the caller's, bit for bit
    assert all(torch.equal(encoder_before[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert all(p.requires_grad for p in (*pipe.unet.parameters(), *pipe.text_encoder.parameters()))
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert tokens.extra["setting"] == "data" and tokens.cells == list(range(9))

    # Every caption (stamped ones extended by "stamp <cells>"), at fixed noise: the tuned UNet and tokens fit them
    # better than the base UNet with the tokens' starting point.
    prep = gt._prepare(pipe, images, captions, boxes, "stamp", 3, 2.0, stamped_only=False)
    assert _fixed_loss(unet, pipe, tokens.vectors, prep) < 0.97 * _fixed_loss(pipe.unet, pipe, prep.vectors, prep)


def test_a_dropped_caption_keeps_the_concept_and_its_cells():
    """Caption dropout drops a caption's words only: an image with the concept keeps "stamp" and its cells' tokens
    (the negative prompt the model will be given), one without it gets the empty caption."""
    from erasekit.shapes.model import ShapesPipeline

    pipe = ShapesPipeline.load()
    images, captions, boxes = data.geom_training_set(16, 4, dropout=0.0)
    prep = gt._prepare(pipe, images, captions, boxes, "stamp", 3, 2.0, stamped_only=False)
    tok = pipe.tokenizer
    vocab = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    stamp = tok("stamp", add_special_tokens=False)["input_ids"]
    empty = tok("", padding="max_length", max_length=77)["input_ids"]
    assert any(boxes) and not all(boxes)
    for row, image_boxes in zip(prep.bare.tolist(), boxes):
        if not image_boxes:
            assert row == empty
            continue
        cells = geom.cells_of_box(image_boxes[0], data.SIZE, data.SIZE, 3)
        expected = [tok.bos_token_id, *stamp, *(vocab + c for c in cells), tok.eos_token_id]
        assert row == expected + [tok.pad_token_id] * (77 - len(expected))


def test_data_setting_is_deterministic_and_checks_its_setting():
    from erasekit.shapes.model import ShapesPipeline

    pipe = ShapesPipeline.load()
    images, captions, boxes = data.geom_training_set(12, 2, dropout=0.0)
    config = _data_config(caption_dropout=0.5, warmup=2)
    runs = [gt.train_data_removal(pipe, images, captions, boxes, "stamp", config) for _ in range(2)]
    (tokens_a, unet_a), (tokens_b, unet_b) = runs
    assert torch.equal(tokens_a.vectors, tokens_b.vectors)
    assert all(torch.equal(v, unet_b.state_dict()[k]) for k, v in unet_a.state_dict().items())
    other = gt.train_data_removal(pipe, images, captions, boxes, "stamp", _data_config(caption_dropout=0.5, seed=1))
    assert not torch.equal(other[0].vectors, tokens_a.vectors)
    with pytest.raises(ValueError, match="train_data_removal"):
        gt.train_location_tokens(pipe, images, captions, boxes, "stamp", _data_config())
    with pytest.raises(ValueError, match="data setting"):
        gt.train_data_removal(pipe, images, captions, boxes, "stamp", gt.GeomTrainConfig())
    with pytest.raises(ValueError, match="unknown Geom-Erasing setting"):
        gt.GeomTrainConfig(setting="both")
    for alpha in (0.0, -2.0):
        with pytest.raises(ValueError, match="alpha must be > 0"):
            gt.GeomTrainConfig(alpha=alpha)


def test_cli_data_setting_writes_a_unet_folder_and_tokens(tmp_path):
    from erasekit.cli.main import main
    from erasekit.shapes.model import ShapesPipeline

    out = tmp_path / "geom"
    assert main(["train-geom", "--setting", "data", "--out", str(out), "--images", "8", "--steps", "2",
                 "--batch-size", "2"]) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    unet, tokens = gt.load_data_removal(out)
    assert tokens.concept == "stamp" and tokens.extra["setting"] == "data" and tokens.extra["steps"] == "2"
    assert tokens.extra["alpha"] == str(gt.SHAPES_DATA_SETTING["alpha"]) != str(gt.GeomTrainConfig().alpha)
    pipe = ShapesPipeline.load()
    pipe.unet = unet
    context = gt.encode_negative(pipe, "stamp", tokens, "everywhere")
    images = pipe(["a red solid circle"] * 2, [0, 1], steps=2, negative_context=context)
    assert images.shape == (2, data.SIZE, data.SIZE, 3)
    # A negative context is the encoded negative, nothing else, whether passed or the pipeline's own.
    worded = pipe(["a red solid circle"], [0], steps=2, negative="stamp")
    assert (worded == pipe(["a red solid circle"], [0], steps=2, negative_context=pipe.encode(["stamp"]))).all()
    pipe.negative_context = pipe.encode(["stamp"])
    assert (worded == pipe(["a red solid circle"], [0], steps=2)).all()
    assert not (worded == pipe(["a red solid circle"], [0], steps=2, negative="circle")).all()  # a call's own wins
    with pytest.raises(FileNotFoundError, match="data-removal folder"):
        gt.load_data_removal(tmp_path)
