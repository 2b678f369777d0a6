"""Speculative decoding: greedy tokens are the model's own, sampled tokens keep the model's distribution."""
import itertools

import pytest
import torch

from minigpt import SamplingParams, generate, load_pretrained
from minigpt.model import GPT
from minigpt.sampling import filter_logits
from minigpt.speed.quantize import Int8Linear, int8_drafts
from tests.helpers.checkpoints import make_checkpoint

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second tiny GPT-2 with other random weights: a draft the model disagrees with most of the time."""
    folder, _ = make_checkpoint(tmp_path_factory.mktemp("other-gpt2"), seed=1)
    return load_pretrained(folder, device="cpu")[0]


@pytest.fixture(scope="module")
def drafts(tiny_model, other_model):
    model = tiny_model[0]
    sharper = model.copy_sharing_weights()  # logits x4: the same top-k sets, far more confident probabilities
    ln_f = sharper.transformer.ln_f
    ln_f.weight, ln_f.bias = (torch.nn.Parameter(t.detach() * 4, requires_grad=False) for t in (ln_f.weight, ln_f.bias))
    return {"int8 copy": int8_drafts(model)[0], "other model": other_model, "the model itself": model,
            "sharper copy": sharper}


def fields(events):
    return [(e.token_id, e.text, e.finish_reason) for e in events]


@pytest.mark.parametrize("draft_name", ["int8 copy", "other model", "the model itself"])
@pytest.mark.parametrize("draft_tokens", [1, 3, 8])
def test_greedy_tokens_are_the_models_own(tiny_model, drafts, draft_name, draft_tokens):
    model, tokenizer, hf_model = tiny_model
    prompt = tokenizer.encode_ordinary("The cat sat on the")
    plain = list(generate(model, tokenizer, prompt, 40, GREEDY))
    fast = list(generate(model, tokenizer, prompt, 40, GREEDY, draft=drafts[draft_name], draft_tokens=draft_tokens))
    assert fields(fast) == fields(plain)
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert [e.token_id for e in fast] == expected[0, len(prompt):].tolist()
    for a, b in zip(fast, plain):  # log-probs come from the model's pass over several tokens
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5])
def test_budget_and_context_window_edges(tiny_model, drafts, max_new_tokens):
    model, tokenizer, _ = tiny_model
    n_positions = model.config.n_positions
    prompt = (tokenizer.encode_ordinary("one two three four five six seven ") * 40)[:n_positions]  # over the window
    plain = list(generate(model, tokenizer, prompt, max_new_tokens, GREEDY))
    fast = list(generate(model, tokenizer, prompt, max_new_tokens, GREEDY, draft=drafts["int8 copy"], draft_tokens=4))
    assert fields(fast) == fields(plain) and len(fast) == max_new_tokens


def test_stop_string_inside_an_accepted_run(tiny_model, drafts):
    model, tokenizer, _ = tiny_model
    prompt = tokenizer.encode_ordinary("The cat sat on the")
    text = "".join(e.text for e in generate(model, tokenizer, prompt, 20, GREEDY))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    plain = list(generate(model, tokenizer, prompt, 20, GREEDY, stop=[stop]))
    fast = list(generate(model, tokenizer, prompt, 20, GREEDY, stop=[stop], draft=drafts["the model itself"]))
    assert fields(fast) == fields(plain) and fast[-1].finish_reason == "stop"


def test_attention_rows_match_one_token_at_a_time(tiny_model, drafts):
    model, tokenizer, _ = tiny_model
    prompt = tokenizer.encode_ordinary("The cat sat on the")
    plain = list(generate(model, tokenizer, prompt, 12, GREEDY, return_attention=True))
    fast = list(generate(model, tokenizer, prompt, 12, GREEDY, return_attention=True, draft=drafts["int8 copy"]))
    assert fields(fast) == fields(plain)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a.attention, b.attention, rtol=0, atol=1e-5)


def exact_distribution(model: GPT, prompt: list[int], params: SamplingParams, n: int) -> dict[tuple, float]:
    """P(first n tokens) under the model's filtered distribution, by enumeration (top-k keeps it small)."""
    def next_probs(ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        return filter_logits(logits, params).softmax(-1)

    dist = {(): 1.0}
    for _ in range(n):
        grown = {}
        for seq, p in dist.items():
            probs = next_probs(prompt + list(seq))
            for t in torch.nonzero(probs).flatten().tolist():
                grown[seq + (t,)] = p * probs[t].item()
        dist = grown
    return dist


def chi_square_p_value(counts: dict[tuple, int], dist: dict[tuple, float]) -> float:
    n = sum(counts.values())
    assert set(counts) <= set(dist), "a sequence the model's filtered distribution cannot produce"
    stat = sum((counts.get(seq, 0) - n * p) ** 2 / (n * p) for seq, p in dist.items())
    return 1 - torch.distributions.Chi2(torch.tensor(len(dist) - 1.0)).cdf(torch.tensor(stat)).item()


SAMPLES = 600
SAMPLING = SamplingParams(temperature=1.0, top_k=3)


@pytest.fixture(scope="module")
def three_token_distribution(tiny_model):
    model, tokenizer, _ = tiny_model
    prompt = tokenizer.encode_ordinary("The cat")
    return prompt, exact_distribution(model, prompt, SAMPLING, 3)  # 27 sequences


def sample_counts(model, tokenizer, prompt, draft) -> dict[tuple, int]:
    counts = {}
    for seed in range(SAMPLES):
        events = itertools.islice(generate(model, tokenizer, prompt, 4, SAMPLING, seed=seed, draft=draft,
                                           draft_tokens=2), 3)
        seq = tuple(e.token_id for e in events)
        counts[seq] = counts.get(seq, 0) + 1
    return counts


@pytest.mark.parametrize("draft_name", ["int8 copy", "sharper copy"])
def test_sampling_keeps_the_models_distribution(tiny_model, drafts, three_token_distribution, draft_name):
    """Tokens 2 and 3 come from one round: two proposals, each accepted or rejected (then a residual draw)."""
    model, tokenizer, _ = tiny_model
    prompt, dist = three_token_distribution
    counts = sample_counts(model, tokenizer, prompt, drafts[draft_name])
    assert chi_square_p_value(counts, dist) > 1e-3


def test_the_distribution_test_can_tell_the_drafts_own_samples(tiny_model, drafts, three_token_distribution):
    """Keeping the sharper draft's proposals unchecked would fail the test above by far."""
    _, tokenizer, _ = tiny_model
    prompt, dist = three_token_distribution
    counts = sample_counts(drafts["sharper copy"], tokenizer, prompt, draft=None)
    assert chi_square_p_value(counts, dist) < 1e-6


def test_int8_drafts_share_weights_and_leave_the_models_float(tiny_model, tmp_path):
    from lora import AdapterConfig, load_tuned_model, save_adapter
    from lora.layer import inject_lora
    model, tokenizer, _ = tiny_model
    trained = model.copy_sharing_weights()
    inject_lora(trained, ["c_attn"], r=4, alpha=8)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a non-zero update, so the tuned c_attn differs from the base
    tuned = load_tuned_model(model, save_adapter(trained, tmp_path / "adapter", AdapterConfig(4, 8, 0.0, ["c_attn"])))

    base_draft, tuned_draft = int8_drafts(model, tuned)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # untouched
    assert isinstance(base_draft.transformer.h[0].mlp.c_fc, Int8Linear)
    assert base_draft.transformer.h[0].mlp.c_fc is tuned_draft.transformer.h[0].mlp.c_fc  # shared weight, one copy
    assert base_draft.transformer.h[0].attn.c_attn is not tuned_draft.transformer.h[0].attn.c_attn  # merged: its own
    assert base_draft.transformer.ln_f.weight is model.transformer.ln_f.weight
    prompt = tokenizer.encode_ordinary("Hello")
    plain = list(generate(tuned, tokenizer, prompt, 16, GREEDY))
    assert fields(generate(tuned, tokenizer, prompt, 16, GREEDY, draft=tuned_draft)) == fields(plain)
    with pytest.raises(ValueError, match="already int8"):
        int8_drafts(base_draft)


def test_a_cache_rewinds_only_to_tokens_it_holds(tiny_model):
    model = tiny_model[0]
    cache = model.new_cache(16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]), cache)
        expected = model(torch.tensor([[7]]), cache)[0, -1]
        cache.rewind(4)  # forget token 7, then feed it again: the same logits
        torch.testing.assert_close(model(torch.tensor([[7]]), cache)[0, -1], expected)
    for bad in (-1, 6):
        with pytest.raises(ValueError, match=f"cannot rewind a cache of 5 tokens to {bad}"):
            cache.rewind(bad)
