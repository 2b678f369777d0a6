"""The numbers the "look inside" views draw, computed once per reply, against independent oracles: transformers'
eager attention, the logit lens computed layer by layer (minigpt.inspection), and the sampler's own stages."""
import base64
import threading

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from minigpt.inspection import attention_entropy, head_similarity, logit_lens, without_sink
from minigpt.sampling import filter_stages
from minigpt.serve.conversation import BASE, Prompt, read_request
from minigpt.serve.panels import band, token_durations, token_text
from minigpt.serve.replies import stream_reply
from minigpt.serve.reply_numbers import as_json, packed, reply_numbers


def unpack(p: dict) -> np.ndarray:
    """What inspect.js does with a packed array."""
    return np.frombuffer(base64.b64decode(p["b64"]), dtype=np.dtype(p["dtype"]).newbyteorder("<")).reshape(p["shape"])


def a_reply(tiny_model, temperature=1.0, top_k=0, top_p=1.0, n=20):
    model, tokenizer, _ = tiny_model
    ids = tokenizer.encode_ordinary("The quick brown fox jumps over the lazy dog. " * 3)[:30]
    request = read_request(BASE, temperature, top_k, top_p, n, 3, 1.0, context=128)[0]
    return list(stream_reply(model, tokenizer, Prompt("", ids, 0, ()), request, threading.Event()))[-1]


@pytest.fixture(scope="module")
def reply(tiny_model):
    return a_reply(tiny_model, temperature=0.8, top_k=40, top_p=0.9)


@pytest.fixture(scope="module")
def numbers(tiny_model, reply):
    model, tokenizer, _ = tiny_model
    return reply_numbers(model, tokenizer, reply, top_keys=16)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return GPT2LMHeadModel.from_pretrained(tiny_checkpoint[0], attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_attention(hf, reply):
    """transformers' eager attention over the same sequence: (n_layer, nh, L, L)."""
    sequence = reply.prompt_ids + reply.token_ids[:-1]
    with torch.no_grad():
        return torch.stack(hf(torch.tensor([sequence]), output_attentions=True).attentions)[:, 0].numpy()


def test_packed_arrays_round_trip():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    np.testing.assert_array_equal(unpack(packed(array, "float32")), array)
    np.testing.assert_allclose(unpack(packed(array, "float16")), array, rtol=1e-3)
    assert unpack(packed(np.array([0, 50256]), "uint16")).tolist() == [0, 50256]


def test_tokens_bands_alternatives_and_timeline(numbers, reply, tiny_model):
    _, tokenizer, _ = tiny_model
    assert numbers["tokens"] == reply.token_ids and numbers["prompt"] == reply.prompt_ids
    assert numbers["band"] == [band(p) for p in numbers["p"]]
    assert [[t for t, _ in top] for top in numbers["top"]] == [[t for t, _ in top] for top in reply.top]
    assert numbers["timeline_ms"] == pytest.approx(token_durations(reply).tolist(), abs=1e-3)
    used = set(reply.prompt_ids) | set(reply.token_ids) | set(unpack(numbers["lens"]["top_ids"]).ravel().tolist())
    assert all(numbers["vocab"][str(t)] == token_text(tokenizer, t) for t in used)
    assert numbers["model"] == reply.request.describe()


def test_attention_is_transformers_eager_attention_top_keys_and_sink(numbers, reply, hf_attention):
    a = numbers["attention"]
    n, p = len(reply.token_ids), len(reply.prompt_ids)
    rows = hf_attention[:, :, p - 1:p - 1 + n]  # the rows that chose the reply's tokens: (n_layer, nh, n, L)
    with_average = np.concatenate([rows, rows.mean(1, keepdims=True)], axis=1)
    ids, values = unpack(a["key_ids"]).astype(int), unpack(a["key_p"]).astype(np.float32)
    assert ids.shape == (2, 5, n, 16) and a["keys"] == rows.shape[-1] and a["heads"] == 4
    np.testing.assert_allclose(values, np.take_along_axis(with_average, ids, -1), rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(values, -np.sort(-with_average, -1)[..., :16], rtol=2e-3, atol=1e-6)  # the largest
    np.testing.assert_allclose(unpack(a["sink"]), with_average[..., 0], rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(a["entropy"], attention_entropy(rows).mean(-1), atol=1e-3)
    np.testing.assert_allclose(a["entropy_sinkless"], attention_entropy(without_sink(rows)).mean(-1), atol=1e-3)
    np.testing.assert_allclose(a["similarity"][1], head_similarity(rows[1]), atol=1e-3)


def test_every_key_is_sent_when_the_rows_are_short(tiny_model, reply, hf_attention):
    model, tokenizer, _ = tiny_model
    a = reply_numbers(model, tokenizer, reply, top_keys=1000)["attention"]
    n, p = len(reply.token_ids), len(reply.prompt_ids)
    dense = np.zeros((2, 5, n, a["keys"]), dtype=np.float32)
    np.put_along_axis(dense, unpack(a["key_ids"]).astype(int), unpack(a["key_p"]).astype(np.float32), -1)
    np.testing.assert_allclose(dense[:, :4], hf_attention[:, :, p - 1:p - 1 + n], rtol=2e-3, atol=1e-6)


def test_lens_is_the_layer_by_layer_logit_lens_at_the_reply_positions(numbers, reply, tiny_model):
    model, _, _ = tiny_model
    lens = logit_lens(model, reply.prompt_ids + reply.token_ids)
    columns = slice(len(reply.prompt_ids) - 1, None)
    got = numbers["lens"]
    assert got["layers"] == ["embeddings", "layer 1", "output"]
    np.testing.assert_array_equal(unpack(got["top_ids"])[..., 0], lens.top_ids[:, columns])
    np.testing.assert_allclose(unpack(got["top_p"])[..., 0], lens.top_probs[:, columns], rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(unpack(got["target_p"]), lens.target_probs[:, columns], rtol=2e-3, atol=1e-6)
    # ranks compare logits there, log-probabilities here: a near-tie may round either way
    np.testing.assert_allclose(unpack(got["target_rank"]), lens.target_ranks[:, columns], atol=1)


def test_lens_is_transformers_hidden_states_read_out_through_ln_f_and_lm_head(numbers, reply, hf):
    """The logit lens against transformers: its hidden states (the embeddings, then each block's output, the
    last one already through ln_f) read out through ln_f and lm_head, at the positions that chose the reply."""
    with torch.no_grad():
        states = hf(torch.tensor([reply.prompt_ids + reply.token_ids[:-1]]), output_hidden_states=True).hidden_states
        rows = [h[0, len(reply.prompt_ids) - 1:] for h in states]
        logits = torch.stack([hf.lm_head(hf.transformer.ln_f(h)) for h in rows[:-1]] + [hf.lm_head(rows[-1])])
    targets = torch.tensor(reply.token_ids).expand(len(rows), -1)[..., None]  # (layers, n, 1)
    probs, got = logits.softmax(-1), numbers["lens"]
    top = probs.topk(5)
    np.testing.assert_array_equal(unpack(got["top_ids"]), top.indices)
    np.testing.assert_allclose(unpack(got["top_p"]), top.values, rtol=2e-3, atol=1e-6)  # float16 on the way
    np.testing.assert_allclose(unpack(got["target_p"]), probs.gather(-1, targets)[..., 0], rtol=2e-3, atol=1e-6)
    np.testing.assert_array_equal(unpack(got["target_rank"]), 1 + (logits > logits.gather(-1, targets)).sum(-1))


def test_sampling_stages_are_the_samplers_own_at_every_position(numbers, reply, tiny_model):
    model, _, _ = tiny_model
    s = numbers["sampling"]
    assert s["stages"] == ["raw", "temperature", "top-k", "top-p", "renormalised"]
    assert s["settings"] == {"raw": None, "temperature": 0.8, "top-k": 40, "top-p": 0.9, "renormalised": None}
    shown_p = unpack(s["shown_p"])
    for position in (1, 7, len(reply.token_ids)):
        ids = reply.prompt_ids + reply.token_ids[:position - 1]
        with torch.no_grad():
            logits = model(torch.tensor([ids]), None, last_only=True)[0, -1].float()
        stages = filter_stages(logits, reply.request.params)
        left = [int(torch.isfinite(stage).sum()) for _, stage in stages]
        assert s["left"][position - 1] == [*left, left[-1]]
        shown, drawn = s["shown"][position - 1], reply.token_ids[position - 1]
        assert drawn in shown and shown[:9] == logits.topk(10).indices.tolist()[:9]
        final = stages[-1][1].softmax(-1)
        np.testing.assert_allclose(shown_p[position - 1, -1], final[shown].numpy(), rtol=1e-4, atol=1e-6)
        assert final[drawn] > 0  # the drawn token survived every cut


def test_stages_that_read_the_sequence_see_it_as_the_sampler_did(tiny_model):
    """A reply drawn under a JSON schema with logit bias and penalties: at every position the numbers are the
    sampler's stages with the reply's history replayed to there (the grammar's state, the tokens so far), so
    the drawn token survives every stage shown."""
    from minigpt.generation import new_history
    from minigpt.serve.conversation import MoreSampling
    model, tokenizer, _ = tiny_model
    more = MoreSampling(0.02, 1.3, 0.4, 0.2, '{"90": 2}', True, '{"type": "object", "properties": {"a": '
                        '{"type": "integer"}}, "required": ["a"], "additionalProperties": false}')
    request = read_request(BASE, 0.9, 0, 1.0, 12, 3, 1.0, context=128, more=more)[0]
    ids = tokenizer.encode_ordinary("JSON:")
    reply = list(stream_reply(model, tokenizer, Prompt("", ids, 0, ()), request, threading.Event()))[-1]
    s = reply_numbers(model, tokenizer, reply)["sampling"]
    assert s["stages"] == ["raw", "JSON grammar", "logit bias", "repetition penalty", "frequency penalty",
                           "presence penalty", "temperature", "min-p", "renormalised"]
    shown_p = unpack(s["shown_p"])
    history = new_history(request.params, tokenizer, reply.prompt_ids)
    for position, drawn in enumerate(reply.token_ids, 1):
        shown = s["shown"][position - 1]
        assert (shown_p[position - 1, 1:, shown.index(drawn)] > 0).all()  # past raw: it survived every stage
        with torch.no_grad():
            logits = model(torch.tensor([ids + reply.token_ids[:position - 1]]), None, last_only=True)[0, -1].float()
        final = filter_stages(logits, request.params, history)[-1][1].softmax(-1)
        np.testing.assert_allclose(shown_p[position - 1, -1], final[shown].numpy(), rtol=1e-4, atol=1e-6)
        history.add(drawn)


def test_greedy_ends_in_the_argmax(tiny_model):
    model, tokenizer, _ = tiny_model
    reply = a_reply(tiny_model, temperature=0.0, n=6)
    s = reply_numbers(model, tokenizer, reply)["sampling"]
    assert s["stages"] == ["raw", "greedy: the argmax"]
    shown_p = unpack(s["shown_p"])
    for i, (shown, drawn) in enumerate(zip(s["shown"], reply.token_ids)):
        assert shown_p[i, -1, shown.index(drawn)] == 1.0


def test_the_json_is_compact(numbers):
    text = as_json(numbers)
    assert "NaN" not in text and ": " not in text[:200]
