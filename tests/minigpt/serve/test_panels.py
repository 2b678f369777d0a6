"""Panel data for the chat app: coloured tokens, top alternatives, attention windows and heatmaps."""
import math
import threading

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from minigpt import SamplingParams, generate
from minigpt.serve.conversation import BASE, Prompt, read_request
from minigpt.serve.panels import (
    BANDS,
    alternatives,
    attention_window,
    band,
    heatmap,
    position_caption,
    token_highlights,
)
from minigpt.serve.replies import Reply, stream_reply


@pytest.fixture(scope="module")
def reply(tiny_model):
    """A 20-token sampled reply of the tiny model after a 30-token prompt."""
    model, tokenizer, _ = tiny_model
    ids = tokenizer.encode_ordinary("The quick brown fox jumps over the lazy dog. " * 3)[:30]
    request = read_request(BASE, 1.0, 0, 1.0, 20, 3, 1.0, context=128)[0]
    return list(stream_reply(model, tokenizer, Prompt("", ids, 0, ()), request, threading.Event()))[-1]


@pytest.fixture(scope="module")
def eager_hf_model(tiny_checkpoint):
    """The same tiny checkpoint in transformers with eager attention, which can return attention weights."""
    folder, _ = tiny_checkpoint
    return GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("prob, label", [(1.0, "p ≥ 0.5"), (0.5, "p ≥ 0.5"), (0.499, "0.1 ≤ p < 0.5"),
                                         (0.1, "0.1 ≤ p < 0.5"), (0.05, "0.01 ≤ p < 0.1"), (0.0099, "p < 0.01"),
                                         (0.0, "p < 0.01")])
def test_probability_bands(prob, label):
    assert band(prob) == label
    assert [b[1] for b in BANDS].count(label) == 1


def test_highlights_colour_every_token_by_its_raw_probability(reply, tiny_model):
    _, tokenizer, _ = tiny_model
    highlights = token_highlights(reply, tokenizer)
    assert len(highlights) == 20
    assert "".join(text for text, _ in highlights) == tokenizer.decode(reply.token_ids, errors="replace")
    assert [label for _, label in highlights] == [band(math.exp(lp)) for lp in reply.logprobs]


def test_alternatives_are_the_raw_top5_of_transformers(reply, tiny_model):
    _, tokenizer, hf_model = tiny_model
    position = 7
    with torch.no_grad():
        logits = hf_model(torch.tensor([reply.prompt_ids + reply.token_ids])).logits[0]
    probs = logits[len(reply.prompt_ids) + position - 2].softmax(-1)  # the logits that chose token 7
    top = probs.topk(5)
    alts = alternatives(reply, tokenizer, position)
    assert list(alts) == [repr(tokenizer.decode([t], errors="replace")) for t in top.indices.tolist()]
    np.testing.assert_allclose(list(alts.values()), top.values.numpy(), atol=1e-5)
    caption = position_caption(reply, tokenizer, position)
    assert caption.startswith("Token 7 of 20: chose ") and "raw model distribution" in caption
    with pytest.raises(ValueError, match="outside the reply"):
        alternatives(reply, tokenizer, 21)


def test_alternatives_keep_tokens_that_look_alike_apart(tiny_model):
    _, tokenizer, _ = tiny_model
    a, b = (tokenizer.encode_single_token(bytes([x])) for x in (0x80, 0x81))  # alone, each shows as U+FFFD
    reply = Reply(BASE, [1], token_ids=[a], logprobs=[-1.0], top=[[(a, math.log(0.5)), (b, math.log(0.25))]])
    assert alternatives(reply, tokenizer, 1) == pytest.approx({"'\ufffd'": 0.5, f"'\ufffd' (id {b})": 0.25})


def test_attention_window_matches_transformers_and_the_streaming_rows(reply, tiny_model, eager_hf_model):
    model, tokenizer, _ = tiny_model
    window = attention_window(model, tokenizer, reply, max_queries=8, max_keys=12)
    n, sequence = 20, reply.prompt_ids + reply.token_ids[:-1]
    assert window.probs.shape == (2, 4, 8, 12)
    assert window.note == "Rows: the last 8 of 20 reply tokens. Columns: the last 12 of 49 context tokens."
    assert len(window.query_labels) == 8 and len(window.key_labels) == 12

    with torch.no_grad():
        hf = eager_hf_model(torch.tensor([sequence]), output_attentions=True).attentions  # n_layer x (1, nh, L, L)
    expected = torch.stack(hf)[:, 0, :, -8:, -12:].numpy()
    np.testing.assert_allclose(window.probs, expected, atol=1e-5)

    # The same rows as generate() reports while streaming, when asked to.
    events = list(generate(model, tokenizer, reply.prompt_ids, n, SamplingParams(1.0), seed=3, return_attention=True))
    assert [e.token_id for e in events] == reply.token_ids
    length = len(sequence)  # row i attends to the first len(prompt) + i positions; pad to the full length
    rows = [torch.nn.functional.pad(e.attention, (0, length - e.attention.size(-1))) for e in events[-8:]]
    np.testing.assert_allclose(window.probs, torch.stack(rows, dim=2)[..., -12:].numpy(), atol=1e-5)


def test_small_conversations_are_shown_whole(reply, tiny_model):
    model, tokenizer, _ = tiny_model
    window = attention_window(model, tokenizer, reply, max_queries=64, max_keys=64)
    assert window.probs.shape == (2, 4, 20, 49)
    assert window.note == "Rows: all 20 reply tokens. Columns: all 49 context tokens."
    np.testing.assert_allclose(window.probs.sum(-1), 1.0, atol=1e-5)  # every key is in view: rows sum to 1


def test_heatmap_shows_one_head_or_the_average(reply, tiny_model):
    model, tokenizer, _ = tiny_model
    window = attention_window(model, tokenizer, reply, max_queries=8, max_keys=12)
    np.testing.assert_allclose(window.matrix(1, None), window.probs[1].mean(axis=0))
    assert np.array_equal(window.matrix(0, 2), window.probs[0, 2])
    for head, title in [(None, "Layer 2, average over heads"), (2, "Layer 2, head 3")]:
        ax = heatmap(window, 1, head).axes[0]
        assert ax.get_title() == title
        assert [t.get_text() for t in ax.get_xticklabels()] == window.key_labels
        assert [t.get_text() for t in ax.get_yticklabels()] == window.query_labels
        shown = ax.images[0].get_array()
        np.testing.assert_allclose(shown.data, window.matrix(1, head))
        assert np.array_equal(shown.mask, window.probs[1, 0] == 0)  # exactly the causally masked keys are blank
