"""One validation layer for the files EraseKit reads (issue #22, findings 3, 4 and 5): hand-made bad files of every
format are refused with an error of the one family (InputError) that names the file and the key, never a KeyError,
RuntimeError, TypeError, IndexError, OverflowError or ZeroDivisionError, and never loaded silently with NaN/Inf or
integer tensors; an erasure that does not fit the model is refused before anything is patched."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from erasekit.erasers.erasure import Erasure, ErasureFileError, ErasureMisfitError, LayerDelta, fingerprint
from erasekit.erasers.errors import FileError, InputError
from erasekit.erasers.files import HASH_KEY, write_safetensors

K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
V = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"


def _erasure(out: int = 320, width: int = 768, rank: int = 2) -> Erasure:
    """A two-layer SD1-shaped erasure sharing one `down` (as closed-form edits do) and one dense layer."""
    g = torch.Generator().manual_seed(0)
    down = torch.randn(rank, width, generator=g) * 0.01
    layers = {K: LayerDelta(up=torch.randn(out, rank, generator=g), down=down),
              V: LayerDelta(up=torch.randn(out, rank, generator=g), down=down),
              Q: LayerDelta(dense=torch.randn(out, out, generator=g) * 0.01)}
    return Erasure(layers=layers, method="uce", family="sd1", concepts=["red circle"], guide=[""], preserve=[],
                   params={"lam": 0.5}, base_fingerprint=[10.0, 11.0, 12.0])


def _parts(tmp_path):
    """(metadata, tensors) of a good erasure file, for editing one thing at a time."""
    from safetensors import safe_open

    path = _erasure().save(tmp_path / "good.safetensors")
    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata()), {k: handle.get_tensor(k).clone() for k in handle.keys()}


def _rewrite(tmp_path, edit_meta=None, edit_tensors=None):
    """A file EraseKit wrote (valid content hash) whose layout was edited: only the structural checks can catch it."""
    meta, tensors = _parts(tmp_path)
    meta.pop(HASH_KEY)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    return write_safetensors(tmp_path / "bad.safetensors", tensors, meta)


def _refused(path, match: str):
    with pytest.raises(ErasureFileError, match=match) as info:
        Erasure.load(path)
    assert str(path) in str(info.value)
    return info.value


# --- erasure files ------------------------------------------------------------------------------------------------


def test_an_erasure_round_trips_with_its_shared_down_and_its_source(tmp_path):
    erasure = _erasure()
    loaded = Erasure.load(erasure.save(tmp_path / "e.safetensors"))
    assert loaded.source == str(tmp_path / "e.safetensors") and list(loaded.layers) == list(erasure.layers)
    assert (loaded.method, loaded.family, loaded.concepts, loaded.guide, loaded.preserve, loaded.params,
            loaded.base_fingerprint) == ("uce", "sd1", ["red circle"], [""], [], {"lam": 0.5}, [10.0, 11.0, 12.0])
    assert loaded.layers[K].down is loaded.layers[V].down
    for name, delta in erasure.layers.items():
        assert torch.equal(loaded.layers[name].materialize(), delta.materialize())


def test_an_erasure_of_format_1_written_before_the_content_hash_still_loads(tmp_path):
    meta, tensors = _parts(tmp_path)
    for key in (HASH_KEY, "erasekit_writer"):
        meta.pop(key)
    meta["erasekit_format"] = "1"
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    loaded = Erasure.load(tmp_path / "old.safetensors")
    for name, delta in _erasure().layers.items():
        assert torch.equal(loaded.layers[name].materialize(), delta.materialize())


@pytest.mark.parametrize("key, value, found", [
    ("groups.0.down", float("nan"), "NaN or infinite"),
    (f"{K}.up", float("inf"), "NaN or infinite"),
    (f"{Q}.diff", float("-inf"), "NaN or infinite"),
    (f"{V}.up", 1e6, "magnitudes ≤ 10000"),
])
def test_an_erasure_tensor_with_nan_inf_or_an_absurd_magnitude_is_refused_by_key(tmp_path, key, value, found):
    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[7] = value

    err = _refused(_rewrite(tmp_path, edit_tensors=poison), found)
    assert err.key == key


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_an_erasure_tensor_of_integers_or_booleans_is_refused(tmp_path, dtype):
    def retype(tensors):
        tensors[f"{K}.up"] = tensors[f"{K}.up"].to(dtype)

    _refused(_rewrite(tmp_path, edit_tensors=retype), rf"{K}\.up.*floating-point.*found {str(dtype)[6:]}")


def test_an_up_factor_whose_rank_differs_from_its_down_is_refused_naming_both_ranks(tmp_path):
    def widen(tensors):
        tensors[f"{K}.up"] = torch.zeros(320, 3)

    _refused(_rewrite(tmp_path, edit_tensors=widen), rf"{K}\.up.*expected rank 2.*rank 3")


def test_a_rank_zero_erasure_is_refused(tmp_path):
    def empty(tensors):
        tensors[f"{K}.up"] = torch.zeros(320, 0)
        tensors[f"{V}.up"] = torch.zeros(320, 0)
        tensors["groups.0.down"] = torch.zeros(0, 768)

    _refused(_rewrite(tmp_path, edit_tensors=empty), "non-empty")


def test_a_factor_of_the_wrong_dimension_count_is_refused(tmp_path):
    def three_d(tensors):
        tensors[f"{K}.up"] = tensors[f"{K}.up"].reshape(320, 2, 1)

    _refused(_rewrite(tmp_path, edit_tensors=three_d), rf"{K}\.up.*2 dimensions")


def test_a_renamed_tensor_is_refused_naming_the_missing_key(tmp_path):
    def rename(tensors):
        tensors["renamed.up"] = tensors.pop(f"{V}.up")

    _refused(_rewrite(tmp_path, edit_tensors=rename), rf"{V}\.up.*no such tensor")


def test_a_stray_tensor_is_refused(tmp_path):
    def add(tensors):
        tensors["groups.7.down"] = torch.zeros(2, 768)

    _refused(_rewrite(tmp_path, edit_tensors=add), r"groups\.7\.down.*only tensors of the layers")


@pytest.mark.parametrize("key", ["method", "family", "concepts", "layers", "layer_groups", "params",
                                 "base_fingerprint", "guide"])
def test_a_missing_metadata_key_is_refused_by_name(tmp_path, key):
    _refused(_rewrite(tmp_path, edit_meta=lambda meta: meta.pop(key)), rf"'{key}'")


@pytest.mark.parametrize("key, value, found", [
    ("concepts", '"red circle"', "expected a JSON list of strings"),
    ("concepts", "[1, 2]", "an item 1"),
    ("preserve", "[", "not JSON"),
    ("params", "[]", "expected a JSON object"),
    ("layers", "{}", "expected a JSON list of strings"),
    ("layers", "[]", "at least one layer"),
    ("layer_groups", json.dumps({K: "zero", V: 0}), "group numbers"),
    ("layer_groups", json.dumps({"unet.elsewhere.weight": 0}), "only layers listed"),
    ("base_fingerprint", "[NaN, 1, 2]", "finite norms"),
    ("base_fingerprint", "[1e999, 1, 2]", "finite norms"),
    ("base_fingerprint", "[1, 2]", "3 norms"),
    ("erasekit_format", "one", "format version"),
    ("erasekit_format", "99999999999999999999999", "format version"),
    ("method", "", "non-empty string"),
])
def test_metadata_of_the_wrong_type_is_refused_by_key(tmp_path, key, value, found):
    err = _refused(_rewrite(tmp_path, edit_meta=lambda meta: meta.__setitem__(key, value)), found)
    assert key in str(err)


def test_a_newer_format_asks_for_an_upgrade(tmp_path):
    _refused(_rewrite(tmp_path, edit_meta=lambda meta: meta.__setitem__("erasekit_format", "3")), "upgrade erasekit")


def test_a_truncated_erasure_file_is_an_erasure_file_error(tmp_path):
    path = _erasure().save(tmp_path / "e.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    _refused(path, "truncated")


def test_an_erasure_file_with_its_hash_deleted_is_refused(tmp_path):
    path = _erasure().save(tmp_path / "e.safetensors")
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    del header["__metadata__"][HASH_KEY]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])
    _refused(path, "written by EraseKit but its content hash is missing")


def test_saving_an_erasure_holding_nan_is_refused_and_writes_nothing(tmp_path):
    erasure = _erasure()
    erasure.layers[Q].dense[0, 0] = float("nan")
    with pytest.raises(ErasureFileError, match=rf"{Q}\.diff.*NaN"):
        erasure.save(tmp_path / "e.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- erasures against a model ---------------------------------------------------------------------------------------


def test_check_fits_names_the_first_misfit_layer_with_both_shapes():
    erasure = _erasure(width=1024)  # an SD2-wide erasure labelled sd1
    shapes = {K: (320, 768), V: (320, 768), Q: (320, 320)}
    with pytest.raises(ErasureMisfitError, match=rf"{K}.*320×1024 in the erasure but 320×768 in the model"):
        erasure.check_fits(shapes)
    with pytest.raises(ErasureMisfitError, match=rf"{Q}.*does not have"):
        _erasure().check_fits({K: (320, 768), V: (320, 768)})
    _erasure().check_fits(shapes)


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    from erasekit.testing import tiny_models as tm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(**{**tm.TINY_SD15_UNET_CONFIG, "block_out_channels": (64, 128)}).eval()


def _fitting(unet, names, width=768) -> Erasure:
    params = dict(unet.named_parameters())
    g = torch.Generator().manual_seed(1)
    down = torch.randn(1, width, generator=g)
    layers = {f"unet.{n}": LayerDelta(up=torch.randn(params[n].shape[0], 1, generator=g), down=down) for n in names}
    return Erasure(layers=layers, method="uce", family="sd1", concepts=["x"])


def test_diffusers_attach_refuses_an_erasure_that_does_not_fit_and_changes_no_weight(unet):
    from erasekit.erasers.diffusers_adapter import attach

    kv = [n for n, _ in unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    wide = _fitting(unet, kv, width=1024)  # 1024-wide factors, family metadata saying sd1 (finding 3)
    with pytest.raises(ErasureMisfitError, match=rf"unet\.{kv[0]}.*×1024 in the erasure but .*×768 in the model"):
        attach(unet, wide)
    extra = _fitting(unet, kv)
    extra.layers["unet.down_blocks.9.attentions.0.transformer_blocks.0.attn2.to_k.weight"] = extra.layers.pop(
        f"unet.{kv[-1]}")
    with pytest.raises(ErasureMisfitError, match=r"down_blocks\.9.*does not have"):
        attach(unet, extra)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert not hasattr(unet, "_erasekit_originals")


def test_diffusers_attach_still_applies_an_erasure_that_fits(unet):
    from erasekit.erasers.diffusers_adapter import attach, detach

    kv = [n for n, _ in unet.named_parameters() if n.endswith("attn2.to_k.weight")]
    erasure = _fitting(unet, kv)
    weight = unet.get_parameter(kv[0]).detach().clone()
    attach(unet, erasure)
    try:
        assert torch.allclose(unet.get_parameter(kv[0]), weight + erasure.layers[f"unet.{kv[0]}"].materialize())
    finally:
        detach(unet)


# --- SPM membranes --------------------------------------------------------------------------------------------------

LORA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _membrane_file(tmp_path, *, down=None, up=None, alpha=None, meta=None, extra=None, name="m.safetensors"):
    """An official-layout SPM file (as the reference writes it: no EraseKit metadata) with one layer changed."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"{LORA}.lora_down.weight": torch.randn(2, 768, generator=g) if down is None else down,
               f"{LORA}.lora_up.weight": torch.randn(320, 2, generator=g) if up is None else up,
               f"{LORA}.alpha": torch.tensor(1.0) if alpha is None else alpha,
               **(extra or {})}
    metadata = {"prompts": "circle", "rank": "2", "alpha": "1.0", **(meta or {})}
    save_file(tensors, str(tmp_path / name), metadata)
    return tmp_path / name


def _membrane_refused(path, match):
    from erasekit.erasers.spm.membrane import MembraneFileError, load_membrane

    with pytest.raises(MembraneFileError, match=match) as info:
        load_membrane(path)
    assert str(path) in str(info.value)


def test_a_good_membrane_file_loads(tmp_path):
    from erasekit.erasers.spm.membrane import load_membrane

    membrane = load_membrane(_membrane_file(tmp_path))
    assert (membrane.rank, membrane.alpha, membrane.family) == (2, 1.0, "sd1")


def _nan(shape, index=3, value=float("nan")):
    t = torch.ones(shape)
    t.view(-1)[index] = value
    return t


@pytest.mark.parametrize("change, match", [
    (dict(down=_nan((2, 768))), r"lora_down\.weight.*NaN"),
    (dict(up=_nan((320, 2), value=float("inf"))), r"lora_up\.weight.*NaN or infinite"),
    (dict(up=torch.ones(320, 2, dtype=torch.int8)), r"lora_up\.weight.*floating-point.*int8"),
    (dict(down=torch.ones(2, 768, dtype=torch.bool)), r"lora_down\.weight.*floating-point.*bool"),
    (dict(down=torch.zeros(0, 768), up=torch.zeros(320, 0), meta={"rank": "0"}), "non-empty"),
    (dict(up=torch.ones(320, 3)), r"lora_up\.weight.*rank 2.*\[320, 3\]"),
    (dict(up=torch.ones(320)), r"lora_up\.weight.*LoRA factors"),
    (dict(down=torch.ones(2, 768, 1)), r"lora_down\.weight.*LoRA factors"),
    (dict(alpha=torch.tensor(float("nan"))), r"\.alpha.*NaN"),
    (dict(alpha=torch.tensor(0.0)), r"\.alpha.*> 0.*found 0"),
    (dict(alpha=torch.tensor(-1.0)), r"\.alpha.*> 0"),
    (dict(alpha=torch.ones(2)), r"\.alpha.*one number"),
    (dict(meta={"alpha": "nan"}), r"'alpha'.*finite"),
    (dict(meta={"alpha": "0"}), r"'alpha'.*> 0"),
    (dict(meta={"rank": "two"}), r"'rank'.*integer"),
    (dict(meta={"rank": "1e999"}), r"'rank'.*finite"),
    (dict(meta={"rank": "3"}), "metadata says rank 3"),
    (dict(down=torch.full((2, 768), 1e6)), "magnitudes"),
    (dict(extra={"lora_unet_not_a_layer.lora_down.weight": torch.ones(2, 768),
                 "lora_unet_not_a_layer.lora_up.weight": torch.ones(320, 2)}), "lora_unet_not_a_layer.*kohya name"),
])
def test_a_bad_membrane_is_a_membrane_file_error_naming_file_and_key(tmp_path, change, match):
    _membrane_refused(_membrane_file(tmp_path, **change), match)


def test_a_truncated_membrane_is_a_membrane_file_error(tmp_path):
    path = _membrane_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-64])
    _membrane_refused(path, "truncated")


def test_saving_a_membrane_holding_inf_is_refused(tmp_path):
    from erasekit.erasers.spm.membrane import MembraneFileError, load_membrane, save_membrane

    membrane = load_membrane(_membrane_file(tmp_path))
    next(iter(membrane.layers.values())).up[0, 0] = float("inf")
    with pytest.raises(MembraneFileError, match="lora_up.weight.*NaN or infinite"):
        save_membrane(membrane, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_membrane_erasekit_wrote_carries_a_hash_that_catches_a_changed_byte(tmp_path):
    from erasekit.erasers.spm.membrane import load_membrane, save_membrane

    path = save_membrane(load_membrane(_membrane_file(tmp_path)), tmp_path / "copy.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    _membrane_refused(path, "changed or damaged")


# --- Geom-Erasing location tokens ----------------------------------------------------------------------------------


def _tokens_file(tmp_path, vectors=None, meta=None, extra=None):
    from erasekit.erasers.geom.negatives import FORMAT, TENSOR_KEY, VERSION

    metadata = {"format": FORMAT, "version": VERSION, "concept": "circle", "grid": "2", "cells": "[0, 3]",
                "tokens": "[]", "width": "8", "family": "sd1", **(meta or {})}
    tensors = {TENSOR_KEY: torch.ones(2, 8) if vectors is None else vectors, **(extra or {})}
    path = tmp_path / "tokens.safetensors"
    save_file(tensors, str(path), {k: v for k, v in metadata.items() if v is not None})
    return path


def _tokens_refused(path, match):
    from erasekit.erasers.geom.negatives import GeomError, LocationTokens, LocationTokensFileError

    with pytest.raises(LocationTokensFileError, match=match) as info:
        LocationTokens.load(path)
    assert isinstance(info.value, GeomError) and isinstance(info.value, FileError)
    assert str(path) in str(info.value)


def test_a_good_location_token_file_loads_and_round_trips(tmp_path):
    from erasekit.erasers.geom.negatives import LocationTokens

    tokens = LocationTokens.load(_tokens_file(tmp_path))
    assert tokens.cells == [0, 3] and tokens.width == 8
    tokens.save(tmp_path / "copy.safetensors")
    again = LocationTokens.load(tmp_path / "copy.safetensors")
    assert torch.equal(again.vectors, tokens.vectors) and again.extra == tokens.extra == {}


@pytest.mark.parametrize("change, match", [
    (dict(vectors=_nan((2, 8))), r"emb_params.*NaN"),
    (dict(vectors=_nan((2, 8), value=float("inf"))), r"emb_params.*NaN or infinite"),
    (dict(vectors=torch.ones(2, 8, dtype=torch.int8)), r"emb_params.*floating-point.*int8"),
    (dict(vectors=torch.ones(2, 8, dtype=torch.bool)), r"emb_params.*floating-point.*bool"),
    (dict(vectors=torch.ones(3, 8)), r"emb_params.*shape 2×8"),
    (dict(vectors=torch.ones(16)), r"emb_params.*2 dimensions"),
    (dict(vectors=torch.full((2, 8), 1e6)), "magnitudes"),
    (dict(meta={"grid": "two"}), r"'grid'.*integer"),
    (dict(meta={"grid": "0"}), r"'grid'"),
    (dict(meta={"width": "1e999"}), r"'width'.*finite"),
    (dict(meta={"cells": "[0, 3"}), r"'cells'.*not JSON"),
    (dict(meta={"cells": '["a", 3]'}), r"'cells'.*distinct cell numbers"),
    (dict(meta={"cells": "[0, 9]"}), r"'cells'.*2×2 grid"),
    (dict(meta={"cells": "[]"}), r"'cells'.*at least one"),
    (dict(meta={"cells": None}), r"'cells'"),
    (dict(meta={"concept": None}), r"'concept'"),
    (dict(meta={"format": "other"}), "not a Geom-Erasing location-token file"),
    (dict(meta={"version": "9"}), "unsupported version"),
    (dict(extra={"stray": torch.ones(1)}), r"'stray'.*one tensor"),
])
def test_a_bad_location_token_file_is_a_file_error_naming_file_and_key(tmp_path, change, match):
    _tokens_refused(_tokens_file(tmp_path, **change), match)


def test_a_truncated_or_missing_location_token_file_names_the_file(tmp_path):
    path = _tokens_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-16])
    _tokens_refused(path, "truncated")
    _tokens_refused(tmp_path / "gone.safetensors", "does not exist")


# --- official UCE/RECE/TRCE files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_convert_refuses_a_layer_holding_nan_or_inf_by_name_instead_of_dropping_it(tmp_path, value):
    from erasekit.erasers.closed_form import official as off
    from erasekit.testing import tiny_models as tm

    base = tm.sd15_cross_attention_weights(seed=0)
    edited = {k: v.clone() for k, v in base.items()}
    keys = list(edited)
    edited[keys[0]] += 0.01 * torch.ones_like(edited[keys[0]])  # a real (rank-1) edit elsewhere
    edited[keys[5]][1, 2] = value
    save_file(edited, str(tmp_path / "uce.safetensors"))
    with pytest.raises(off.ConversionError, match=rf"uce\.safetensors.*{keys[5]}.*finite values.*NaN or infinite"):
        off.convert(tmp_path / "uce.safetensors", base)


def test_convert_refuses_a_base_holding_nan_in_an_edited_layer(tmp_path):
    from erasekit.erasers.closed_form import official as off
    from erasekit.testing import tiny_models as tm

    base = tm.sd15_cross_attention_weights(seed=0)
    edited = {k: v + 0.01 for k, v in base.items()}
    save_file(edited, str(tmp_path / "uce.safetensors"))
    key = list(base)[3]
    base[key] = base[key].clone()
    base[key][0, 0] = float("nan")
    with pytest.raises(off.ConversionError, match=rf"the base.*{key}.*NaN"):
        off.convert(tmp_path / "uce.safetensors", base)


# --- AdvUnlearn encoders and CLIP text models ----------------------------------------------------------------------

TINY_CLIP = dict(vocab_size=99, hidden_size=768, intermediate_size=32, num_hidden_layers=1, num_attention_heads=12,
                 max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=0,
                 eos_token_id=2, pad_token_id=1)
EMBEDDING = "text_model.embeddings.token_embedding.weight"


def _clip_state():
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.erasers.io.clip_names import file_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).eval()
    return model, {k: v.detach().clone() for k, v in file_state_dict(model).items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("poison, match", [
    (lambda t: t.__setitem__((0, 0), float("nan")), "NaN"),
    (lambda t: t.__setitem__((1, 1), float("inf")), "NaN or infinite"),
    ("int8", "floating-point.*int8"),
    ("bool", "floating-point.*bool"),
])
def test_an_advunlearn_encoder_with_nan_inf_or_integer_weights_is_refused_by_key(tmp_path, poison, match):
    from erasekit.erasers.advunlearn.encoder import load_advunlearn
    from erasekit.erasers.io.text_encoders import TextEncoderError

    _, state = _clip_state()
    if isinstance(poison, str):
        state[EMBEDDING] = state[EMBEDDING].to(getattr(torch, poison))
    else:
        poison(state[EMBEDDING])
    path = tmp_path / "encoder.safetensors"
    save_file(state, str(path))
    with pytest.raises(TextEncoderError, match=rf"encoder\.safetensors.*{EMBEDDING}.*{match}"):
        load_advunlearn(path)


def test_a_clean_advunlearn_encoder_still_loads(tmp_path):
    from erasekit.erasers.advunlearn.encoder import load_advunlearn

    _, state = _clip_state()
    save_file(state, str(tmp_path / "encoder.safetensors"))
    assert torch.equal(load_advunlearn(tmp_path / "encoder.safetensors").state_dict[EMBEDDING], state[EMBEDDING])


def test_load_file_state_dict_refuses_an_int8_weight_naming_its_source():
    from erasekit.erasers.io.clip_names import load_file_state_dict

    model, state = _clip_state()
    state[EMBEDDING] = state[EMBEDDING].to(torch.int8)
    with pytest.raises(FileError, match=rf"mine\.safetensors.*{EMBEDDING}.*int8"):
        load_file_state_dict(model, state, source="mine.safetensors")


def test_save_text_model_refuses_nan_weights_and_writes_nothing(tmp_path):
    from erasekit.erasers.io.clip_names import save_text_model

    model, _ = _clip_state()
    with torch.no_grad():
        model.text_model.final_layer_norm.weight[0] = float("nan")
    with pytest.raises(FileError, match="final_layer_norm.weight.*NaN"):
        save_text_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_text_model_writes_a_hashed_file_that_loads_back(tmp_path):
    from erasekit.erasers.files import read_safetensors
    from erasekit.erasers.io.clip_names import save_text_model

    model, state = _clip_state()
    folder = save_text_model(model, tmp_path / "out")
    meta, tensors = read_safetensors(folder / "model.safetensors")
    assert meta["format"] == "pt" and HASH_KEY in meta
    assert all(torch.equal(tensors[k], v) for k, v in state.items())


def _saved_folder(tmp_path):
    from erasekit.erasers.io.clip_names import save_text_model

    model, _ = _clip_state()
    return save_text_model(model, tmp_path / "out")


@pytest.mark.parametrize("config, match", [
    ("[1, 2]", "JSON object.*found list"),
    ('{"hidden_size": "64"}', "'hidden_size'.*whole number.*'64'"),
    ('{"num_hidden_layers": 0}', "'num_hidden_layers'.*whole number"),
    ('{"hidden_act": 3}', "'hidden_act'.*activation"),
    ('{"layer_norm_eps": NaN}', "finite numbers.*NaN"),
    ('{"hidden_size": 64', "not readable JSON"),
])
def test_an_advunlearn_folder_whose_config_is_not_a_clip_config_is_refused_naming_it(tmp_path, config, match):
    from erasekit.erasers.advunlearn.encoder import load_advunlearn
    from erasekit.erasers.io.text_encoders import TextEncoderError

    folder = _saved_folder(tmp_path)
    merged = json.loads((folder / "config.json").read_text())
    try:
        merged.update(json.loads(config))
        text = json.dumps(merged)
    except (ValueError, TypeError, AttributeError):
        text = config  # not an object, or not JSON at all: written as it is
    (folder / "config.json").write_text(text)
    with pytest.raises(TextEncoderError, match=match):
        load_advunlearn(folder)


def test_a_changed_byte_in_a_saved_text_encoders_weights_is_refused_by_its_hash(tmp_path):
    from erasekit.erasers.advunlearn.encoder import load_advunlearn
    from erasekit.erasers.io.text_encoders import TextEncoderError

    folder = _saved_folder(tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-5] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(TextEncoderError, match="model.safetensors.*changed or damaged"):
        load_advunlearn(folder)


def test_a_token_embedding_that_is_not_a_matrix_is_a_text_encoder_error_naming_it(tmp_path):
    from erasekit.erasers.advunlearn.encoder import load_advunlearn
    from erasekit.erasers.io.text_encoders import TextEncoderError

    _, state = _clip_state()
    state[EMBEDDING] = state[EMBEDDING].reshape(-1)
    save_file(state, str(tmp_path / "encoder.safetensors"))
    with pytest.raises(TextEncoderError, match=rf"encoder\.safetensors.*{EMBEDDING}.*matrix"):
        load_advunlearn(tmp_path / "encoder.safetensors")


def test_a_position_embedding_that_is_not_a_matrix_is_a_text_encoder_error(tmp_path):
    from erasekit.erasers.advunlearn.encoder import load_advunlearn
    from erasekit.erasers.io.text_encoders import TextEncoderError

    _, state = _clip_state()
    state["text_model.embeddings.position_embedding.weight"] = torch.zeros(77)
    save_file(state, str(tmp_path / "encoder.safetensors"))
    with pytest.raises(TextEncoderError, match="position_embedding weight has shape \\[77\\]"):
        load_advunlearn(tmp_path / "encoder.safetensors")


# --- checkpoints ---------------------------------------------------------------------------------------------------


def test_a_checkpoint_with_nan_in_an_edited_layer_is_refused_naming_file_and_key(tmp_path, tiny_checkpoint):
    from erasekit.erasers.io.checkpoints import CheckpointError, read_checkpoint
    from erasekit.erasers.io.model_files import open_model

    state = read_checkpoint(tiny_checkpoint)
    key = next(k for k in sorted(state) if k.endswith("attn2.to_v.weight"))
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"nan\.safetensors.*attn2\.to_v\.weight.*NaN"):
        open_model(path).kv_weights()
    assert open_model(tiny_checkpoint).kv_weights()  # the clean checkpoint still reads


def test_apply_refuses_to_merge_into_a_nan_layer(tmp_path, tiny_checkpoint):
    from erasekit.erasers.io.checkpoints import CheckpointError, read_checkpoint
    from erasekit.erasers.io.model_files import open_model

    clean = open_model(tiny_checkpoint).kv_weights()
    name = sorted(clean)[0]
    state = read_checkpoint(tiny_checkpoint)
    model = open_model(tiny_checkpoint)
    key = model.ldm_key(f"unet.{name}")
    state[key] = state[key].clone()
    state[key][0, 0] = float("inf")
    save_file(state, str(tmp_path / "inf.safetensors"))
    weight = clean[name]
    erasure = Erasure(layers={f"unet.{name}": LayerDelta(dense=torch.zeros(weight.shape))}, method="uce",
                      family="sd1", concepts=["x"], base_fingerprint=fingerprint({name: weight}))
    with pytest.raises(CheckpointError, match=rf"inf\.safetensors.*{name}.*NaN or infinite"):
        open_model(tmp_path / "inf.safetensors").merge(erasure, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# --- the family ----------------------------------------------------------------------------------------------------


def test_every_new_error_belongs_to_the_one_family():
    from erasekit.erasers.geom.negatives import LocationTokensFileError
    from erasekit.erasers.spm.membrane import MembraneFileError

    for kind in (ErasureFileError, ErasureMisfitError, MembraneFileError, LocationTokensFileError):
        assert issubclass(kind, InputError) and issubclass(kind, ValueError)


def test_a_pickle_whose_bytes_trip_torch_is_a_checkpoint_error_not_its_exception(tmp_path):
    import io
    import zipfile

    from erasekit.erasers.io.checkpoints import CheckpointError, read_checkpoint

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer)
    damaged = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(damaged, "w") as out:
        for item in source.infolist():
            data = source.read(item)
            # a BINPUT memo index far past the memo: torch's unpickler raises an IndexError or a KeyError
            out.writestr(item, data.replace(b"q\x00", b"h\xff") if item.filename.endswith("data.pkl") else data)
    (tmp_path / "bad.pt").write_bytes(damaged.getvalue())
    with pytest.raises(CheckpointError, match="bad.pt is not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "bad.pt")


def test_a_unet_key_outside_the_layout_its_other_keys_describe_is_a_named_error(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file

    from erasekit.erasers.io.model_files import open_model
    state = load_file(str(tiny_checkpoint))
    key = next(k for k in state if ".input_blocks." in k and k.endswith("attn2.to_k.weight"))
    state[key.replace(".input_blocks.1.", ".input_blocks.77.")] = state.pop(key)
    save_file(state, str(tmp_path / "odd.safetensors"))
    with pytest.raises(InputError, match="input_blocks.77.*not a cross-attention block"):
        open_model(tmp_path / "odd.safetensors").kv_weights()
