"""Temperature, top-k, top-p and min-p, logit bias and the penalties on hand-made distributions (transformers'
logits processors as the oracles where it has them), and the sampler's frequencies."""
import math

import pytest
import torch

from minigpt.sampling import History, SamplingParams, draw, filter_logits, filter_stages, sample

PROBS = torch.tensor([0.05, 0.40, 0.10, 0.25, 0.20])  # sorted: idx 1 (.40), 3 (.25), 4 (.20), 2 (.10), 0 (.05)
LOGITS = PROBS.log()


def kept(params: SamplingParams) -> set[int]:
    return set(torch.isfinite(filter_logits(LOGITS, params)).nonzero().flatten().tolist())


def test_top_k_keeps_the_k_most_likely():
    assert kept(SamplingParams(top_k=1)) == {1}
    assert kept(SamplingParams(top_k=3)) == {1, 3, 4}
    assert kept(SamplingParams(top_k=0)) == {0, 1, 2, 3, 4}  # 0 = off
    assert kept(SamplingParams(top_k=99)) == {0, 1, 2, 3, 4}  # more than the vocabulary = off


@pytest.mark.parametrize("top_p, expected", [
    (0.39, {1}),  # the top token alone (0.40) reaches 0.39
    (0.41, {1, 3}),  # 0.40 is short of 0.41: the next one is needed
    (0.64, {1, 3}),
    (0.66, {1, 3, 4}),
    (0.95, {1, 3, 4, 2}),
    (0.96, {0, 1, 2, 3, 4}),
    (1e-9, {1}),  # always keeps at least one token
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(SamplingParams(top_p=top_p)) == expected


def test_top_p_applies_after_temperature():
    # At temperature 2 the distribution flattens: 0.40 alone no longer reaches 0.45.
    flat = (LOGITS / 2).softmax(-1)
    assert flat[1] < 0.45
    assert kept(SamplingParams(temperature=2.0, top_p=0.45)) == {1, 3}
    assert kept(SamplingParams(temperature=1.0, top_p=0.39)) == {1}


def test_top_p_after_top_k_keeps_what_transformers_keeps():
    """Top-p after top-k sorts only what top-k left: the tokens kept are those of transformers' warpers, which
    sort the whole vocabulary, also in a row with ties at the k-th logit and a row with fewer than k allowed."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(4, 50257, generator=torch.Generator().manual_seed(5))
    top = logits.topk(45).indices
    logits[1, top[1, 38:45]] = logits[1, top[1, 38]].item()  # ties: top-k 40 keeps 45
    logits[2, 3:] = float("-inf")  # three tokens allowed, as a grammar's mask may leave
    for top_p in (0.5, 0.8, 0.99999):  # cuts above the ties, and none
        ours = filter_logits(logits, SamplingParams(temperature=0.7, top_k=40, top_p=top_p))
        theirs = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(40)(None, TemperatureLogitsWarper(0.7)(None, logits)))
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), top_p
    assert torch.isfinite(ours[1]).sum() == 45 and torch.isfinite(ours[2]).sum() == 3  # the ties and the mask kept


def test_greedy_is_argmax_and_ignores_filters():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert sample(logits, SamplingParams(temperature=0)).flatten().tolist() == [1, 0]


def test_greedy_takes_the_first_of_tied_maxima_as_argmax_does():
    logits = torch.randn(3, 50257, generator=torch.Generator().manual_seed(0))
    logits[0, [17, 50000]] = logits[1, [40000, 3]] = logits[2, [9, 10, 11]] = 100.0
    ours = sample(logits, SamplingParams(temperature=0)).flatten()
    assert ours.tolist() == logits.argmax(dim=-1).tolist() == [17, 3, 9]


def test_sampled_frequencies_match_the_renormalised_distribution():
    """20,000 draws with top-k=4, top-p=0.9 at temperature 0.7; each frequency within 5 standard errors."""
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9)
    target = filter_logits(LOGITS, params).softmax(-1)
    # independent computation of the same target: temperature, keep the 4 best, then the 0.9 nucleus
    p = (LOGITS / 0.7).softmax(-1)
    order = p.argsort(descending=True)[:4].tolist()
    p4 = {i: p[i].item() / sum(p[j].item() for j in order) for i in order}
    nucleus, mass = [], 0.0
    for i in order:
        if mass >= 0.9:
            break
        nucleus.append(i)
        mass += p4[i]
    expected = torch.zeros(5)
    for i in nucleus:
        expected[i] = p4[i] / sum(p4[j] for j in nucleus)
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-6)

    n = 20_000
    gen = torch.Generator().manual_seed(1234)
    draws = sample(LOGITS.expand(n, 5), params, gen).flatten()
    freq = torch.bincount(draws, minlength=5).float() / n
    for i in range(5):
        se = math.sqrt(max(expected[i].item() * (1 - expected[i].item()), 1e-12) / n)
        assert abs(freq[i].item() - expected[i].item()) <= 5 * se + 1e-9, (i, freq, expected)
    assert freq[expected == 0].sum() == 0  # filtered tokens are never drawn


def test_same_seed_same_draws():
    params = SamplingParams(temperature=1.0)
    a = sample(LOGITS.expand(50, 5), params, torch.Generator().manual_seed(7))
    b = sample(LOGITS.expand(50, 5), params, torch.Generator().manual_seed(7))
    c = sample(LOGITS.expand(50, 5), params, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)



def test_draw_takes_each_index_as_often_as_its_probability_and_never_one_of_probability_0():
    """Two rows of their own (not normalised; zeros first, between and last) in one call: each index's
    frequency within 5 standard errors of probs / sum, and a 0 never drawn."""
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0],
                          [3.0, 0.0, 1.0, 0.0, 0.0, 4.0]])
    n = 20_000
    draws = draw(probs.repeat(n, 1), torch.Generator().manual_seed(3))
    assert draws.shape == (2 * n, 1) and draw(probs[0]).shape == (1,)
    for row, p in zip(draws.view(n, 2).T, probs):
        expected = (p / p.sum()).double()
        freq = torch.bincount(row, minlength=6).double() / n
        se = (expected * (1 - expected) / n).sqrt()
        assert ((freq - expected).abs() <= 5 * se).all(), (freq, expected)
        assert freq[expected == 0].sum() == 0


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=40, top_p=0.95),
                                    SamplingParams(temperature=1.3, top_k=200, min_p=0.05),
                                    SamplingParams(temperature=0.5, top_k=3)])
def test_a_row_draws_what_the_full_pipeline_gives(params):
    """With top-k on, sample() runs the warpers on the tokens top-k keeps only: seed for seed, the same tokens
    as a draw from filter_logits' whole row (the sampling panel's last stage); a tie at the k-th value too."""
    row = torch.randn(50257, generator=torch.Generator().manual_seed(4)) * 3
    tied = row.clone()
    tied[[10, 20, 30, 40]] = row.max() + 1  # four at the top: top_k=3 keeps them all
    for logits in row, tied:
        full = filter_logits(logits, params).softmax(dim=-1)
        for seed in range(200):
            assert int(sample(logits, params, torch.Generator().manual_seed(seed))) \
                == int(draw(full, torch.Generator().manual_seed(seed))), seed

@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
])
def test_bad_parameters_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1e308, top_p=1e-320),  # logits round into a tie
                                    SamplingParams(temperature=1e-320, top_p=1e-300),  # p rounds to 0
                                    SamplingParams(temperature=1e308, top_k=1)])
def test_the_most_likely_token_survives_float32_rounding(params):
    logits = torch.tensor([0.0, 1.0, -3.0])
    assert torch.isfinite(filter_logits(logits, params))[1]
    assert sample(logits, params, torch.Generator().manual_seed(0)).item() in (
        {1} if params.top_k == 1 or params.temperature < 1 else {0, 1, 2})


def test_pipeline_stages_end_in_the_distribution_the_sampler_draws_from():
    """The stages the chat's sampling panel shows: their last one, renormalised, is what sample() draws from."""
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9)
    stages = filter_stages(LOGITS, params)
    assert [name for name, _ in stages] == ["raw", "temperature", "top-k", "top-p"]
    assert [int(torch.isfinite(s).sum()) for _, s in stages] == [5, 5, 4, 3]  # survivors: top-p keeps 1, 3, 4
    torch.testing.assert_close(stages[1][1].softmax(-1), (LOGITS / 0.7).softmax(-1))
    final = stages[-1][1].softmax(-1)
    n = 20_000
    draws = sample(LOGITS.expand(n, 5), params, torch.Generator().manual_seed(7)).flatten()
    freq = torch.bincount(draws, minlength=5).float() / n
    for i in range(5):
        se = math.sqrt(max(final[i].item() * (1 - final[i].item()), 1e-12) / n)
        assert abs(freq[i].item() - final[i].item()) <= 5 * se + 1e-9, (i, freq, final)
    assert [name for name, _ in filter_stages(LOGITS, SamplingParams(temperature=0))] == ["raw"]
    assert [name for name, _ in filter_stages(LOGITS, SamplingParams(top_k=0, top_p=1.0))] == ["raw", "temperature"]


# --- the stages that read the request or the sequence: transformers' logits processors are the oracles ------

VOCAB_LOGITS = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 3


def last(params, history=None, logits=VOCAB_LOGITS):
    return filter_stages(logits, params, history)[-1][1]


def test_repetition_penalty_is_transformers_over_the_prompt_and_the_generated_tokens():
    from transformers import RepetitionPenaltyLogitsProcessor
    seen = [3, 7, 7, 12, 40]  # prompt 3, 7; generated 7, 12, 40
    history = History(seen[:2])
    for token in seen[2:]:
        history.add(token)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), VOCAB_LOGITS[None].clone())[0]
    torch.testing.assert_close(last(SamplingParams(temperature=0, repetition_penalty=1.3), history), expected)


def test_frequency_and_presence_penalties_follow_openais_formula():
    history = History([5, 6])  # prompt tokens are not penalised by these two
    for token in [9, 9, 9, 11]:
        history.add(token)
    params = SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=1.5)
    stages = filter_stages(VOCAB_LOGITS, params, history)
    assert [name for name, _ in stages] == ["raw", "frequency penalty", "presence penalty"]
    expected = VOCAB_LOGITS.clone()
    expected[9] -= 3 * 0.5 + 1.5  # logit - count * frequency_penalty - (count > 0) * presence_penalty
    expected[11] -= 1 * 0.5 + 1.5
    torch.testing.assert_close(stages[-1][1], expected)


def test_logit_bias_adds_to_the_logits_and_can_ban_or_force_a_token():
    bias = SamplingParams(temperature=0, logit_bias=((2, 100.0), (int(VOCAB_LOGITS.argmax()), -100.0)))
    expected = VOCAB_LOGITS.clone()
    expected[2] += 100
    expected[int(VOCAB_LOGITS.argmax())] -= 100
    torch.testing.assert_close(last(bias), expected)
    assert sample(VOCAB_LOGITS, bias).item() == 2  # no history needed: logit_bias reads the request only


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_keeps_what_transformers_min_p_keeps(min_p):
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper
    params = SamplingParams(temperature=0.8, min_p=min_p)
    scores = TemperatureLogitsWarper(0.8)(None, VOCAB_LOGITS[None].clone())
    expected = MinPLogitsWarper(min_p)(None, scores)[0]
    assert torch.equal(torch.isfinite(last(params)), torch.isfinite(expected))
    torch.testing.assert_close(last(params).softmax(-1), expected.softmax(-1))


def test_penalised_stages_come_before_the_warpers_and_greedy_takes_their_argmax():
    history = History([int(VOCAB_LOGITS.argmax())])
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.1, repetition_penalty=2.0,
                            logit_bias=((1, 1.0),))
    assert [name for name, _ in filter_stages(VOCAB_LOGITS, params, history)] == [
        "raw", "logit bias", "repetition penalty", "temperature", "top-k", "top-p", "min-p"]
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(VOCAB_LOGITS, greedy, history=history).item() == int(last(greedy, history).argmax())
    assert sample(VOCAB_LOGITS, greedy, history=history).item() != int(VOCAB_LOGITS.argmax())


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_p=1.5), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(logit_bias=((1, 101.0),)), "logit_bias"),
    (dict(logit_bias=((-1, 1.0),)), "logit_bias"),
])
def test_bad_history_parameters_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
