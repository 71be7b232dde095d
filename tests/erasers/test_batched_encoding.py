"""Batched text encoding (erasers/text.py encode_each, nodes' ComfyEncoder): several prompts per text-encoder call
give the embeddings that one call per prompt gives, in order, with progress between batches and a way to stop."""
from __future__ import annotations

import warnings

import pytest
import torch

from erasekit.erasers.text import CONTEXT_TOKENS, Encoded, TruncationWarning, encode_each

LONG = " ".join(f"word{i}" for i in range(60))  # two 77-token chunks: only the first is an erasure key
PROMPTS = ["red circle", "", "a photo of a striped blue star in the top left corner", "(red:1.3) circle, (blue:0.7)",
           LONG, "a green triangle", "a   spaced    prompt", "square"]


def _one_at_a_time(clip, prompt: str) -> torch.Tensor:
    """The unbatched reference: the prompt alone, every chunk, as CLIPTextEncode encodes it (ComfyEncoder before
    batching); its first 77 positions."""
    return clip.encode_from_tokens(clip.tokenize(prompt))[0, :CONTEXT_TOKENS].float().cpu()


def _encoded(clip, prompts, **kwargs) -> Encoded:
    from erasekit.nodes.comfy_adapter import ComfyEncoder

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        return ComfyEncoder(clip, **kwargs)(prompts)


@pytest.mark.parametrize("batch_size", [1, 32])
def test_batched_comfy_encoding_equals_one_prompt_at_a_time(loaded, batch_size):
    _, clip = loaded
    with torch.inference_mode():
        reference = torch.stack([_one_at_a_time(clip, p) for p in PROMPTS])
    ours = _encoded(clip, PROMPTS, batch_size=batch_size)
    assert ours.embeddings.shape == reference.shape == (len(PROMPTS), CONTEXT_TOKENS, 768)
    # Each prompt's chunk is padded to 77 on its own in both, so only float rounding of a larger matmul may differ.
    assert (ours.embeddings - reference).abs().max().item() <= 1e-5
    # The long prompt's first chunk: 74 word tokens in the 2024 ComfyUI (it moves a word that does not fit whole
    # into the next chunk), 75 in the newest (it splits the word).
    first = [t[0] for t in next(iter(clip.tokenize(LONG).values()))[0]]
    assert ours.lengths[:3] == [2, 0, 12] and ours.lengths[4] == first.index(49407) - 1 in (74, 75)


def test_batched_encoding_keeps_each_prompt_in_its_place(loaded):
    """Not trivially equal: the prompts' embeddings differ, and a reversed list gives the rows reversed."""
    _, clip = loaded
    forward = _encoded(clip, PROMPTS, batch_size=3)
    backward = _encoded(clip, PROMPTS[::-1], batch_size=3)
    assert torch.allclose(forward.embeddings, backward.embeddings.flip(0), atol=1e-5)
    assert forward.lengths == backward.lengths[::-1]
    assert (forward.embeddings[0] - forward.embeddings[5]).abs().max() > 1e-2


def test_batched_encoding_makes_one_text_encoder_call_per_batch(loaded):
    _, clip = loaded
    calls = []
    original = clip.encode_from_tokens

    def counted(tokens, *args, **kwargs):
        calls.append(len(next(iter(tokens.values()))))
        return original(tokens, *args, **kwargs)

    clip.encode_from_tokens = counted
    try:
        _encoded(clip, PROMPTS, batch_size=3)
    finally:
        del clip.encode_from_tokens
    assert calls == [3, 3, 2]  # chunks per call: one per prompt, the long prompt's second chunk never encoded


def _fake_batch(items) -> Encoded:
    """A batch encoder whose row i holds item i's number, to check order and joining without a model."""
    return Encoded(torch.tensor([[[float(x)]] for x in items]), [int(x) for x in items])


def test_encode_each_joins_batches_in_order_and_reports_progress():
    seen = []
    out = encode_each(list(range(10)), _fake_batch, batch_size=4, progress=lambda done, total: seen.append((done,
                                                                                                              total)))
    assert out.embeddings.flatten().tolist() == list(range(10)) and out.lengths == list(range(10))
    assert seen == [(4, 10), (8, 10), (10, 10)]


def test_encode_each_stops_between_batches_when_progress_raises():
    encoded = []

    def batch(items):
        encoded.extend(items)
        return _fake_batch(items)

    def stop_after_two(done, total):
        if done >= 4:
            raise KeyboardInterrupt("interrupted")

    with pytest.raises(KeyboardInterrupt):
        encode_each(list(range(10)), batch, batch_size=2, progress=stop_after_two)
    assert encoded == [0, 1, 2, 3]  # nothing after the batch that reported 4 done


def test_encode_each_refuses_a_batch_size_below_one():
    with pytest.raises(ValueError, match="batch_size must be ≥ 1, got 0"):
        encode_each([1], _fake_batch, batch_size=0)


def test_encode_each_sizes_its_batches_to_a_target_time():
    """Batches start at one item and double while quick, halve when slow: a stop comes within about the target."""
    import time

    sizes = []

    def batch(items):
        sizes.append(len(items))
        time.sleep(0.2 * len(items) if len(sizes) in (7, 8) else 0.02 * len(items))  # the 7th and 8th are slow
        return _fake_batch(items)

    out = encode_each(list(range(100)), batch, batch_size=8, seconds=0.5)
    assert out.embeddings.flatten().tolist() == list(range(100)) and out.lengths == list(range(100))
    assert sizes[:7] == [1, 2, 4, 8, 8, 8, 8]  # 0.16 s for 8 items is under half the target: capped at batch_size
    assert sizes[7:11] == [4, 2, 4, 8]  # after 1.6 s, then 0.8 s (over the target): halved twice; then quick again
