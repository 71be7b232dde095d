"""Official UCE/RECE/TRCE releases converted to erasures: files written in the exact official layouts and key names.

- UCE 2025: ``save_file({name + '.weight': W*})`` of the attn2 K/V weights (the 32 SD1.5 ones, full size);
- UCE 2023 / RECE: ``torch.save(unet.state_dict())`` of a real diffusers UNet2DConditionModel (the tiny SD1.5 layout
  at a quarter of its widths: the same 286 keys, 5 M parameters, context width 768);
- TRCE: ``unet.save_pretrained(dir)`` of the same UNet, K/V edited low-rank and attn1.* / attn2.to_q densely.
Edits have a known low rank with one right factor per context width, as closed-form edits have.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from erasekit.erasers.closed_form import official as off
from erasekit.erasers.erasure import Erasure, fingerprint
from erasekit.erasers.io.checkpoints import CheckpointError
from erasekit.testing import tiny_models as tm

TOL = off.DEFAULT_TOL
# The tiny SD1.5 UNet's layout and naming, narrower: the full-UNet files stay small and quick to write and read.
UNET_CONFIG = {**tm.TINY_SD15_UNET_CONFIG, "block_out_channels": (64, 128)}


# Tiny tensors and many small operations: with the cores shared, one thread is faster than two.
pytestmark = pytest.mark.usefixtures("one_thread")


def is_kv(key: str) -> bool:
    return key.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))


def is_trce_stage2(key: str) -> bool:
    return (".attn1." in key or ".attn2.to_q." in key) and key.startswith(("down_blocks", "mid_block", "up_blocks"))


def low_rank_edit(weights: dict[str, torch.Tensor], rank: int, seed: int,
                  scale: float = 0.05) -> dict[str, torch.Tensor]:
    """ΔW = A·S per K/V weight, one S (rank×n) per context width, ‖ΔW‖ ≈ scale·‖W‖; float64."""
    generator = torch.Generator().manual_seed(seed)
    shared: dict[int, torch.Tensor] = {}
    deltas = {}
    for key, w in weights.items():
        d, n = w.shape
        if n not in shared:
            shared[n] = torch.randn(rank, n, generator=generator, dtype=torch.float64) / n**0.5
        up = torch.randn(d, rank, generator=generator, dtype=torch.float64)
        delta = up @ shared[n]
        deltas[key] = delta * (scale * float(w.double().norm()) / float(delta.norm()))
    return deltas


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def unet_sd() -> dict[str, torch.Tensor]:
    """A small SD1.5-shaped diffusers UNet's state dict (real diffusers names), seeded."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET_CONFIG)
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def rece_file(tmp_path_factory, unet_sd):
    """torch.save of the full state dict with only the attn2 K/V weights changed (rank 3); and the true deltas."""
    kv = {k: v for k, v in unet_sd.items() if is_kv(k)}
    deltas = low_rank_edit(kv, rank=3, seed=1)
    edited = {k: (v.double() + deltas[k]).float() if k in deltas else v for k, v in unet_sd.items()}
    path = tmp_path_factory.mktemp("rece") / "nudity_ep2.pt"
    torch.save(edited, path)
    return path, deltas


# ---------------------------------------------------------------------------------------------------------------
# UCE 2025


def test_uce_2025_file_becomes_a_low_rank_erasure_that_round_trips(tmp_path):
    base = tm.sd15_cross_attention_weights(seed=0)
    assert len(base) == 32
    deltas = low_rank_edit(base, rank=4, seed=2)
    keys = list(base)
    # One layer edited in its own subspace (rank 2) and one not low rank: factors of their own, and dense.
    generator = torch.Generator().manual_seed(3)
    odd, full = keys[5], keys[-1]
    deltas[odd] = (torch.randn(base[odd].shape[0], 2, generator=generator, dtype=torch.float64)
                   @ torch.randn(2, 768, generator=generator, dtype=torch.float64)) * 1e-3
    deltas[full] = torch.randn(base[full].shape, generator=generator, dtype=torch.float64) * 1e-3
    edited = {k: (base[k].double() + deltas[k]).float() for k in keys}
    path = tmp_path / "vangogh_uce.safetensors"
    save_file(edited, str(path))

    assert off.detect_format(path) == "uce-2025"
    erasure, report = off.convert(path, base, concepts=["Van Gogh"])
    assert list(erasure.layers) == ["unet." + k for k in sorted(keys, key=off._natural_key)]
    assert erasure.method == "uce-2025" and erasure.family == "sd1" and erasure.concepts == ["Van Gogh"]
    assert erasure.params == {"source_format": "uce-2025", "source_file": path.name, "svd_tol": TOL}
    for key in keys:
        layer = erasure.layers["unet." + key]
        assert relative(layer.materialize(), deltas[key]) <= TOL, key
        if key == full:
            assert layer.dense is not None
        else:
            assert layer.dense is None and layer.rank == (2 if key == odd else 4), key
    shared = {id(layer.down) for key, layer in erasure.layers.items() if layer.dense is None and odd not in key}
    assert len(shared) == 1  # one `down` for every layer of the width's common edit
    assert report.max_error <= TOL
    assert {r.rank for r in report.layers} == {4, 2, None}
    assert report.erasure_bytes < report.dense_bytes / 20 and report.unchanged == 0
    assert "32 layers differ" in report.text() and "max reconstruction error" in report.text()

    # The erasure's base fingerprint is the base weights', in layer order: check_base passes silently.
    assert erasure.base_fingerprint == fingerprint({k: base[k[len("unet."):]] for k in erasure.layers})
    saved = erasure.save(tmp_path / "converted.safetensors")
    loaded = Erasure.load(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.check_base("sd1", {"unet." + k: v for k, v in base.items()})
    assert (loaded.method, loaded.family, loaded.params) == (erasure.method, erasure.family, erasure.params)
    for name, layer in erasure.layers.items():
        assert torch.equal(loaded.layers[name].materialize(), layer.materialize())
    assert off.detect_format(saved) == "erasekit"
    with pytest.raises(off.ConversionError, match="already an EraseKit erasure"):
        off.convert(saved, base)


def test_half_precision_base_is_rounding_aware(rece_file, unet_sd):
    """A float16 base differs from the float32 file by rounding everywhere: only the real edits remain, at their
    true rank."""
    path, deltas = rece_file
    base16 = {k: v.half() for k, v in unet_sd.items()}
    erasure, report = off.convert(path, base16)
    assert set(erasure.layers) == {"unet." + k for k in deltas}
    assert report.unchanged == len(unet_sd) - len(deltas)
    for key, delta in deltas.items():
        layer = erasure.layers["unet." + key]
        assert layer.dense is None and layer.rank == 3, key
        assert relative(layer.materialize(), delta) < 5e-3  # float16 rounding of the base, ‖ΔW‖ = 5% of ‖W‖
    assert all(r.error <= r.bound for r in report.layers) and report.max_error > TOL


# ---------------------------------------------------------------------------------------------------------------
# UCE 2023 / RECE


def test_rece_full_unet_state_dict_keeps_only_the_edited_kv_layers(rece_file, unet_sd):
    path, deltas = rece_file
    assert off.detect_format(path) == "unet-state-dict"
    erasure, report = off.convert(path, unet_sd)
    assert set(erasure.layers) == {"unet." + k for k in deltas} and len(deltas) == 14
    assert erasure.method == "uce-2023-or-rece" and erasure.family == "sd1"
    assert report.unchanged == len(unet_sd) - 14 and report.not_compared == 0
    for key, delta in deltas.items():
        layer = erasure.layers["unet." + key]
        assert layer.dense is None and layer.rank == 3
        assert relative(layer.materialize(), delta) <= TOL
    assert report.max_error <= TOL and not report.warnings

    # Only the tensors the method edits are needed from the base; the caller may name the method and concepts.
    kv_base = {"unet." + k: v for k, v in unet_sd.items() if is_kv(k)}
    named, report_kv = off.convert(path, kv_base, method="rece", concepts=["nudity"])
    assert named.method == "rece" and named.concepts == ["nudity"]
    assert set(named.layers) == set(erasure.layers) and report_kv.not_compared == len(unet_sd) - 14


def test_wrapped_half_precision_state_dict(tmp_path, unet_sd):
    """A top-level "state_dict" (with a step counter beside it), saved in float16, against the float32 base."""
    kv = {k: v for k, v in unet_sd.items() if is_kv(k)}
    deltas = low_rank_edit(kv, rank=2, seed=4)
    edited = {k: ((v.double() + deltas[k]) if k in deltas else v).half() for k, v in unet_sd.items()}
    path = tmp_path / "erased-nudity-towards_uncond-preserve_false-sd_1_4-method_replace.pt"
    torch.save({"state_dict": edited, "global_step": 1}, path)
    erasure, report = off.convert(path, unet_sd)
    assert set(erasure.layers) == {"unet." + k for k in deltas}
    assert all(layer.rank == 2 and layer.dense is None for layer in erasure.layers.values())
    assert all(relative(erasure.layers["unet." + k].materialize(), d) < 5e-3 for k, d in deltas.items())


def test_another_base_model_is_refused_unless_not_strict(rece_file, unet_sd):
    path, deltas = rece_file
    other = dict(unet_sd)
    other["conv_in.weight"] = unet_sd["conv_in.weight"] + 0.01
    with pytest.raises(off.ConversionError, match=r"1 tensors outside.*conv_in\.weight.*not the model"):
        off.convert(path, other)
    erasure, report = off.convert(path, other, strict=False)
    assert set(erasure.layers) == {"unet." + k for k in deltas} | {"unet.conv_in.weight"}
    assert erasure.layers["unet.conv_in.weight"].dense.shape == unet_sd["conv_in.weight"].shape
    assert report.warnings and "conv_in.weight" in report.warnings[0]


class NotATensor:
    pass


def test_pickle_with_python_objects_is_not_unpickled(tmp_path, unet_sd):
    path = tmp_path / "Church_ep0.pt"
    torch.save({"conv_in.weight": unet_sd["conv_in.weight"], "args": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="contains Python objects besides tensors"):
        off.convert(path, unet_sd)


# ---------------------------------------------------------------------------------------------------------------
# TRCE


@pytest.fixture(scope="module")
def trce_folder(tmp_path_factory, unet_sd):
    from diffusers import UNet2DConditionModel

    kv = {k: v for k, v in unet_sd.items() if is_kv(k)}
    deltas = low_rank_edit(kv, rank=2, seed=5)
    generator = torch.Generator().manual_seed(6)
    for key, value in unet_sd.items():
        if is_trce_stage2(key):
            deltas[key] = torch.randn(value.shape, generator=generator, dtype=torch.float64) * 1e-3
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.load_state_dict({k: ((v.double() + deltas[k]).float() if k in deltas else v) for k, v in unet_sd.items()},
                         assign=True)
    root = tmp_path_factory.mktemp("trce")
    folder = root / "saved_ckpt" / "stage2" / "sexual_default" / "2"
    unet.save_pretrained(folder)
    # The same UNet as the other files save_pretrained can write: a PyTorch .bin, and safetensors shards.
    unet.save_pretrained(root / "bin", safe_serialization=False)
    unet.save_pretrained(root / "sharded", max_shard_size="5MB")
    return folder, deltas


def test_trce_folder_factorises_kv_and_keeps_stage2_dense(trce_folder, unet_sd):
    folder, deltas = trce_folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert off.detect_format(folder) == off.detect_format(folder / "config.json") == "diffusers-unet"
    assert off.detect_format(folder / "diffusion_pytorch_model.safetensors") == "diffusers-unet"
    erasure, report = off.convert(folder, unet_sd)
    assert set(erasure.layers) == {"unet." + k for k in deltas}
    assert erasure.method == "trce" and erasure.params["trce_stage2"] is True
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias" in erasure.layers
    assert "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_q.weight" in erasure.layers
    for key, delta in deltas.items():
        layer = erasure.layers["unet." + key]
        if is_kv(key):
            assert layer.dense is None and layer.rank == 2, key
            assert relative(layer.materialize(), delta) <= TOL
        else:
            assert layer.dense is not None and layer.dense.shape == delta.shape, key
            assert relative(layer.dense, delta) < 1e-4  # float32 rounding of W* only
    assert report.unchanged == len(unet_sd) - len(deltas)


def test_trce_folder_as_bin_or_shards(trce_folder, unet_sd):
    folder, deltas = trce_folder
    root = folder.parents[3]
    assert (root / "bin" / "diffusion_pytorch_model.bin").is_file()
    assert (root / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    expected, _ = off.convert(folder, unet_sd)
    for variant in ("bin", "sharded"):
        erasure, _ = off.convert(root / variant, unet_sd)
        assert list(erasure.layers) == list(expected.layers)
        for name, layer in erasure.layers.items():
            assert torch.equal(layer.materialize(), expected.layers[name].materialize()), (variant, name)


def test_trce_needs_the_stage2_tensors_of_the_base(trce_folder, unet_sd):
    folder, _ = trce_folder
    with pytest.raises(off.ConversionError, match=r"lack .*attn1.*pass the whole base UNet state dict"):
        off.convert(folder, {k: v for k, v in unet_sd.items() if is_kv(k)})


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_file_equal_to_the_base_is_refused(tmp_path):
    base = tm.sd15_cross_attention_weights(seed=0)
    path = tmp_path / "same.safetensors"
    save_file(base, str(path))
    with pytest.raises(off.ConversionError, match="equals the base model"):
        off.convert(path, base)


def sdxl_kv_shapes() -> dict[str, tuple[int, int]]:
    return {f"{block}.{p}.weight": shape for block, shape in tm.unet_cross_attention_shapes(tm.SDXL_UNET_CONFIG).items()
            for p in ("to_k", "to_v")}


def test_wrong_family_is_named(tmp_path):
    sd15 = tm.sd15_cross_attention_weights(seed=0)
    shapes = sdxl_kv_shapes()
    assert len(shapes) == 140
    path = tmp_path / "cat_uce_sdxl.safetensors"
    save_file({k: torch.zeros(s) for k, s in list(shapes.items())[:4]}, str(path))
    with pytest.raises(off.ConversionError) as info:
        off.convert(path, sd15)
    message = str(info.value)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert key in message and "[640, 2048]" in message and "[640, 768]" in message
    assert "Stable Diffusion XL" in message and "Stable Diffusion 1.x" in message

    # An SD1.5 file against an SDXL base: the first key the base lacks is named.
    path = tmp_path / "sd15_uce.safetensors"
    save_file(sd15, str(path))
    sdxl_base = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with pytest.raises(off.ConversionError, match=r"base has no down_blocks\.0\.attentions\.0\..*attn2\.to_k\.weight.*"
                                                  r"Stable Diffusion 1\.x"):
        off.convert(path, sdxl_base)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "uce.safetensors"
    save_file(tm.sd15_cross_attention_weights(seed=0), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        off.detect_format(path)
    with pytest.raises(CheckpointError, match="truncated"):
        off.convert(path, tm.sd15_cross_attention_weights(seed=0))


def test_unknown_formats_name_the_accepted_ones(tmp_path):
    base = {"conv_in.weight": torch.zeros(1)}
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(unrelated))
    ldm = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(2, 2)},
              str(ldm))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    for path in (text, unrelated, ldm, empty, vae):
        with pytest.raises(off.ConversionError, match="EraseKit converts") as info:
            off.convert(path, base)
        assert "TRCE" in str(info.value) and "RECE" in str(info.value) and "UCE (2025" in str(info.value)
    with pytest.raises(off.ConversionError, match="single-file"):
        off.detect_format(ldm)
    with pytest.raises(off.ConversionError, match="no such file"):
        off.detect_format(tmp_path / "missing.safetensors")
    # A pickle is read (weights only) before its keys are judged.
    pickle = tmp_path / "embedding.pt"
    torch.save({"string_to_param": torch.zeros(3, 768)}, pickle)
    with pytest.raises(off.ConversionError, match="EraseKit converts"):
        off.convert(pickle, base)
    with pytest.raises(ValueError, match="tol"):
        off.convert(text, base, tol=0)
