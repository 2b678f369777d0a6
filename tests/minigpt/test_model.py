"""Our GPT-2 against transformers' GPT2LMHeadModel on the same tiny random checkpoints."""
import pytest
import torch

from minigpt import SamplingParams, generate, load_pretrained
from tests.helpers.checkpoints import make_checkpoint

CONFIGS = {
    "narrow": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "deeper": dict(n_embd=96, n_layer=3, n_head=6, n_positions=96, n_inner=200),
}


@pytest.fixture(scope="module", params=[(c, s) for c in CONFIGS for s in ("official", "transformers")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, tmp_path_factory):
    config, style = request.param
    folder, hf_model = make_checkpoint(tmp_path_factory.mktemp(f"{config}-{style}"), style, seed=3, **CONFIGS[config])
    model, tokenizer = load_pretrained(folder, device="cpu")
    return model, tokenizer, hf_model


def test_logits_match_transformers(pair):
    model, _, hf_model = pair
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.n_positions), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_64_greedy_tokens_match_transformers(pair):
    model, tokenizer, hf_model = pair
    prompt = tokenizer.encode_ordinary("The meaning of life is")
    ours = [e.token_id for e in generate(model, tokenizer, prompt, 64, SamplingParams(temperature=0))]
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    # generate() stops early only at <|endoftext|>; transformers was told not to, so compare the common part.
    assert len(ours) == 64 or ours[-1] == tokenizer.eot_token
    assert ours == theirs[:len(ours)]


def test_cached_decode_equals_full_recompute_at_every_step(tiny_model):
    model, _, _ = tiny_model
    idx = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(40)
    with torch.no_grad():
        full = model(idx)
        chunks = [model(idx[:, :16], cache)]  # prefill
        chunks += [model(idx[:, 16:19], cache)]  # several tokens after a cached prefix
        chunks += [model(idx[:, t:t + 1], cache) for t in range(19, 40)]  # one token per step
    stepped = torch.cat(chunks, dim=1)
    assert cache.length == 40
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5)
    assert torch.equal(stepped.argmax(-1), full.argmax(-1))


def test_attention_paths_agree_and_rows_are_causal_distributions(tiny_model):
    model, _, _ = tiny_model
    idx = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = model(idx)
        explicit, att = model.forward_with_attention(idx)
    torch.testing.assert_close(explicit, fast, rtol=0, atol=1e-5)
    cfg = model.config
    assert att.shape == (cfg.n_layer, 2, cfg.n_head, 30, 30)
    torch.testing.assert_close(att.sum(-1), torch.ones(cfg.n_layer, 2, cfg.n_head, 30))
    future = torch.ones(30, 30, dtype=torch.bool).triu(diagonal=1)
    assert att[..., future].abs().max() == 0


def test_attention_path_with_cache_matches_uncached(tiny_model):
    model, _, _ = tiny_model
    idx = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(20)
    with torch.no_grad():
        _, full_att = model.forward_with_attention(idx)
        model(idx[:, :12], cache)
        _, step_att = model.forward_with_attention(idx[:, 12:], cache)
    torch.testing.assert_close(step_att, full_att[:, :, :, 12:, :], rtol=0, atol=1e-6)


def test_context_window_is_enforced(tiny_model):
    model, _, _ = tiny_model
    n = model.config.n_positions
    with pytest.raises(ValueError, match=f"context window is {n}"):
        model(torch.zeros(1, n + 1, dtype=torch.long))


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_presets_have_the_size_of_the_hub_models(name):
    """Parameter counts of our presets against transformers' GPT2LMHeadModel of the same published sizes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from minigpt import GPT, GPTConfig
    sizes = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}
    n_embd, n_layer, n_head = sizes[name]
    with torch.device("meta"):
        ours = GPT(GPTConfig.from_name(name))
        theirs = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert count == {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                     "gpt2-xl": 1_557_611_200}[name]


def test_gradient_checkpointing_recomputes_the_same_gradients(tiny_model):
    import copy
    model, _, _ = tiny_model
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        trained = copy.deepcopy(model).train().requires_grad_(True)  # the shared model may have been frozen
        trained.grad_checkpoint = recompute
        trained(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in trained.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
