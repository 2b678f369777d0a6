"""Panel data for the chat app: probability bands and top alternatives (the views' numbers: test_reply_numbers.py)."""
import math
import threading

import numpy as np
import pytest
import torch

from minigpt.serve.conversation import BASE, Prompt, read_request
from minigpt.serve.panels import BANDS, alternatives, band, position_caption
from minigpt.serve.replies import Reply, stream_reply


@pytest.fixture(scope="module")
def reply(tiny_model):
    """A 20-token sampled reply of the tiny model after a 30-token prompt."""
    model, tokenizer, _ = tiny_model
    ids = tokenizer.encode_ordinary("The quick brown fox jumps over the lazy dog. " * 3)[:30]
    request = read_request(BASE, 1.0, 0, 1.0, 20, 3, 1.0, context=128)[0]
    return list(stream_reply(model, tokenizer, Prompt("", ids, 0, ()), request, threading.Event()))[-1]


@pytest.mark.parametrize("prob, label", [(1.0, "p ≥ 0.5"), (0.5, "p ≥ 0.5"), (0.499, "0.1 ≤ p < 0.5"),
                                         (0.1, "0.1 ≤ p < 0.5"), (0.05, "0.01 ≤ p < 0.1"), (0.0099, "p < 0.01"),
                                         (0.0, "p < 0.01")])
def test_probability_bands(prob, label):
    assert band(prob) == label
    assert [b[1] for b in BANDS].count(label) == 1


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
