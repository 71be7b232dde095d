"""The one pipeline loader: which folders each command takes, refused before anything is loaded."""
from __future__ import annotations

import json

import pytest

from erasekit.cli.main import main
from erasekit.cli.pipelines import load_pipeline


def _index(folder, name):
    """A diffusers folder with only its model_index.json: loading anything from it would fail on missing files."""
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": name, "text_encoder": ["transformers", "X"]}))
    return folder


def test_an_sdxl_folder_is_refused_by_a_trainer_naming_it_before_loading(tmp_path):
    folder = _index(tmp_path / "xl", "StableDiffusionXLPipeline")
    with pytest.raises(NotImplementedError, match=r"is an SDXL pipeline \(StableDiffusionXLPipeline\); AdvUnlearn "
                                                  r"training supports SD1.x/SD2.x pipelines and the shapes world"):
        load_pipeline(folder, user="AdvUnlearn training")


def test_train_geom_refuses_a_diffusers_folder_before_loading_it(tmp_path, capsys):
    folder = _index(tmp_path / "sd", "StableDiffusionPipeline")
    out = tmp_path / "tokens.safetensors"
    assert main(["train-geom", "--model", str(folder), "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "is an SD1.x/SD2.x pipeline (StableDiffusionPipeline); train-geom (pixel-space models) supports the " \
           "shapes world" in err
    assert not out.exists()


def test_a_folder_of_another_pipeline_class_is_named_whatever_the_caller_takes(tmp_path):
    folder = _index(tmp_path / "flux", "FluxPipeline")
    for kinds in (("shapes",), ("shapes", "sd", "sdxl")):
        with pytest.raises(ValueError, match="holds a FluxPipeline"):
            load_pipeline(folder, kinds=kinds)
