"""Continuous batching: a stream decoded in a batch, with any neighbours joining and leaving, gives the
same tokens and log-probs as generate() decoding it alone, for base, tuned and other LoRA scales in one
batch, through the C step and through PyTorch; and the greedy tokens are transformers' and peft's."""
import pytest
import torch

from minigpt.batching import Stream, decode, prefill_together
from minigpt.generation import generate
from minigpt.inference import load_with_scale
from minigpt.sampling import SamplingParams
from tests.helpers.app_server import make_adapter
from tests.minigpt.test_scoring import peft_model

GREEDY = SamplingParams(0.0)
SAMPLED = SamplingParams(0.9, 20, 0.9)


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory):
    return make_adapter(tiny_checkpoint[0], tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module", params=["C decode step", "PyTorch", "int8"])
def served(request, tiny_checkpoint, adapter):
    """(base decoder, the adapter at any scale, tokenizer), decoding through the C step, PyTorch or int8."""
    with pytest.MonkeyPatch.context() as env:
        if request.param == "PyTorch":
            env.setenv("MINIGPT_FLOAT32_KERNEL", "pytorch")
        precision = "int8" if request.param == "int8" else "float32"
        base, lora, tokenizer = load_with_scale(tiny_checkpoint[0], adapter, "cpu", precision)
    assert base.kernel == ("PyTorch" if request.param == "PyTorch" else "C decode step")
    return base, lora, tokenizer


def is_int8(decoder):
    return decoder.model.lm_head.weight.dtype == torch.int8


def alone(model, tokenizer, job):
    """The single-stream path: generate() decoding this job by itself."""
    prompt, n, params, seed = job
    return [(e.token_id, e.logprob) for e in generate(model, tokenizer, prompt, n, params, seed=seed)]


def batched(models, tokenizer, jobs, joins, chunk=1000):
    """Decode jobs together: job i joins at step joins[i]; streams leave when they finish."""
    streams, out, step = {}, {i: [] for i in range(len(jobs))}, 0
    while len(streams) < len(jobs) or any(not s.finished for s in streams.values()):
        for i, job in enumerate(jobs):
            if joins[i] == step:
                prompt, n, params, seed = job
                streams[i] = Stream(models[i], tokenizer, prompt, n, params, seed)
        for i, s in streams.items():  # prompts are read between decode steps, a chunk at a time
            if not s.prefilled:
                out[i] += [(e.token_id, e.logprob) for e in s.prefill(chunk)]
        live = [(i, s) for i, s in streams.items() if s.prefilled and not s.finished]
        if live:
            for (i, _), e in zip(live, decode([s for _, s in live])):
                out[i].append((e.token_id, e.logprob))
        step += 1
    return [out[i] for i in range(len(jobs))]


def jobs_for(tokenizer):
    texts = ["Hello there", "The quick brown fox jumps over the lazy dog", "A", "Once upon a time, in a land"]
    return [(tokenizer.encode_ordinary(t), n, params, seed)
            for t, n, params, seed in zip(texts, [12, 20, 7, 16], [GREEDY, SAMPLED, SAMPLED, GREEDY], [1, 2, 3, 4])]


def assert_same(got, expected, exact, int8=False):
    """Tokens identical; log-probs equal (exact), else within 1e-5 (float32). int8 prefills run in bfloat16
    through PyTorch's int8 kernels, whose rounding depends on how many prompt rows go in one call: a prompt
    read in chunks moves log-probs by up to ~1e-3 there."""
    assert [t for t, _ in got] == [t for t, _ in expected]
    tolerance = 0 if exact else 5e-3 if int8 else 1e-5
    torch.testing.assert_close(torch.tensor([lp for _, lp in got]), torch.tensor([lp for _, lp in expected]),
                               rtol=0, atol=tolerance)


def test_a_stream_in_a_batch_decodes_as_it_would_alone_whoever_joins_and_leaves(served):
    base, lora, tokenizer = served
    models = [base, lora.tuned, lora.decoder(0.5), base]  # three models, shared weights, one batch
    jobs = jobs_for(tokenizer)
    got = batched(models, tokenizer, jobs, joins=[0, 0, 3, 5], chunk=4)  # later rows join mid-stream
    for model, job, tokens in zip(models, jobs, got):  # prompts read in chunks: the cache to float rounding
        assert_same(tokens, alone(model, tokenizer, job), exact=False, int8=is_int8(base))


def test_every_batch_size_gives_the_same_streams(served):
    base, _, tokenizer = served
    job = jobs_for(tokenizer)[1]  # sampled
    expected = alone(base, tokenizer, job)
    for size in (1, 2, 5):
        for tokens in batched([base] * size, tokenizer, [job] * size, joins=[0] * size):
            # the C step computes each row exactly as alone; PyTorch's batched matmul to float rounding
            assert_same(tokens, expected, exact=base.kernel == "C decode step")


def test_batched_greedy_tokens_are_transformers_and_peft_tokens(tiny_checkpoint, adapter):
    base, lora, tokenizer = load_with_scale(tiny_checkpoint[0], adapter, "cpu", "float32")
    prompts = [tokenizer.encode_ordinary(t) for t in ("Hello there", "The quick brown fox")]
    oracles = [tiny_checkpoint[1], peft_model(tiny_checkpoint, adapter, 0.5)]
    got = batched([base, lora.decoder(0.5)], tokenizer, [(p, 10, GREEDY, 0) for p in prompts], joins=[0, 2])
    for prompt, oracle, tokens in zip(prompts, oracles, got):
        with torch.no_grad():
            out = oracle.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=50256)
        expected = out.sequences[0, len(prompt):].tolist()
        assert [t for t, _ in tokens] == expected
        raw = torch.stack([logits[0].log_softmax(-1) for logits in out.logits])
        torch.testing.assert_close(torch.tensor([lp for _, lp in tokens]), raw[torch.arange(10), expected],
                                   atol=1e-4, rtol=0)


def test_a_branch_reads_its_forced_tokens_with_the_prompt_as_generate_does(served):
    base, _, tokenizer = served
    prompt = tokenizer.encode_ordinary("The quick brown fox")
    forced = [262, 318, 257]
    expected = [(e.token_id, e.logprob) for e in generate(base, tokenizer, prompt, 8, SAMPLED, seed=5, forced=forced)]
    stream = Stream(base, tokenizer, prompt, 8, SAMPLED, 5, forced=forced)
    got = [(e.token_id, e.logprob) for e in stream.prefill(100)]
    while not stream.finished:
        got += [(e.token_id, e.logprob) for e in decode([stream])]
    assert [t for t, _ in got[:3]] == forced
    assert_same(got, expected, exact=False)  # one pass over prompt + forced, as generate's


def test_prompts_that_arrive_together_are_read_in_one_pass_as_each_alone(served):
    base, lora, tokenizer = served
    jobs = jobs_for(tokenizer)  # prompts of 2 to 10 tokens, right-padded to the longest in the pass
    models = [base, base, base, base]
    streams = [Stream(m, tokenizer, prompt, n, params, seed) for m, (prompt, n, params, seed) in zip(models, jobs)]
    got = [[(e.token_id, e.logprob) for e in events] for events in prefill_together(streams)]
    while any(not s.finished for s in streams):
        live = [(i, s) for i, s in enumerate(streams) if not s.finished]
        for (i, _), e in zip(live, decode([s for _, s in live])):
            got[i].append((e.token_id, e.logprob))
    for model, job, tokens in zip(models, jobs, got):
        assert_same(tokens, alone(model, tokenizer, job), exact=False, int8=is_int8(base))
