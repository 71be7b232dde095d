"""Soft prompts (erasers/attack/soft_prompt.py) against typed prompts: a prefix made of real word embeddings must encode
exactly as the words typed in front of the prompt."""
from __future__ import annotations

import pytest
import torch

from erasekit.erasers.attack import soft_prompt
from erasekit.shapes import model


@pytest.fixture(scope="module")
def pipe():
    return model.ShapesPipeline.load()


def test_prefix_of_word_embeddings_equals_the_typed_words(pipe):
    prompts = ["a blue striped circle", "a star"]
    words = pipe.tokenizer("red dotted", add_special_tokens=False).input_ids
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = soft_prompt.prefixed_ids(pipe.tokenizer, prompts, len(words))
    with torch.no_grad():
        soft = soft_prompt.encode(pipe.text_encoder, ids, table[words])
        per_row = soft_prompt.encode(pipe.text_encoder, ids, table[words].expand(2, -1, -1).clone())
    typed = pipe.encode([f"red dotted {p}" for p in prompts])
    assert torch.equal(soft, typed) and torch.equal(per_row, typed)
    # The hook is gone afterwards: the placeholder ids encode as themselves again.
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks
    assert soft_prompt.nearest_tokens(pipe.text_encoder, table[words] + 1e-3).tolist() == words


def test_gradient_reaches_the_prefix_only_through_the_encoder(pipe):
    ids = soft_prompt.prefixed_ids(pipe.tokenizer, ["a circle"], 2)
    prefix = torch.zeros(2, model.CONTEXT_DIM, requires_grad=True)
    soft_prompt.encode(pipe.text_encoder, ids, prefix).sum().backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    pipe.text_encoder.zero_grad(set_to_none=True)


def test_long_prompts_are_cut_to_77_and_negative_k_is_refused(pipe):
    ids = soft_prompt.prefixed_ids(pipe.tokenizer, [" ".join(["red"] * 90)], 3)
    assert ids.shape == (1, 77)
    with pytest.raises(ValueError, match="k >= 0"):
        soft_prompt.prefixed_ids(pipe.tokenizer, ["a circle"], -1)
