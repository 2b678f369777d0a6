"""The logit lens and attention statistics against transformers' hidden states and attentions."""
import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from minigpt.inspection import (
    attention_entropy,
    head_similarity,
    layer_logprobs,
    logit_lens,
    without_sink,
)
from minigpt.speed.decoder import Decoder

IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198, 40, 588, 11]


@pytest.fixture(scope="module")
def hf_outputs(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf, hf(torch.tensor([IDS]), output_hidden_states=True, output_attentions=True)


def oracle_logprobs(hf, hidden_states):
    """GPT-2's final LayerNorm and lm_head on each hidden state; transformers' last one is already through ln_f."""
    last = len(hidden_states) - 1
    with torch.no_grad():
        return torch.stack([hf.lm_head(h[0] if i == last else hf.transformer.ln_f(h[0])).log_softmax(-1)
                            for i, h in enumerate(hidden_states)])


def test_layer_logprobs_equal_ln_f_and_lm_head_on_transformers_hidden_states(tiny_model, hf_outputs):
    model, _, _ = tiny_model
    hf, out = hf_outputs
    ours = layer_logprobs(Decoder(model), IDS)
    assert ours.shape == (model.config.n_layer + 1, len(IDS), model.config.vocab_size)
    torch.testing.assert_close(ours, oracle_logprobs(hf, out.hidden_states), rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[-1], out.logits[0].log_softmax(-1), rtol=0, atol=1e-4)  # last row = output


def test_logit_lens_grid_reads_top1_and_the_next_tokens_probability_and_rank(tiny_model, hf_outputs):
    model, _, _ = tiny_model
    hf, out = hf_outputs
    lens = logit_lens(model, IDS)
    expected = oracle_logprobs(hf, out.hidden_states)[:, :-1]  # column t predicts IDS[t + 1]
    assert lens.top_ids.shape == (model.config.n_layer + 1, len(IDS) - 1)
    np.testing.assert_array_equal(lens.top_ids, expected.argmax(-1).numpy())
    np.testing.assert_allclose(lens.top_probs, expected.max(-1).values.exp().numpy(), atol=1e-4)
    target = expected.gather(2, torch.tensor(IDS[1:]).expand(expected.size(0), -1)[..., None])[..., 0]
    np.testing.assert_allclose(lens.target_probs, target.exp().numpy(), atol=1e-4)
    ranks = 1 + (expected > target[..., None]).sum(-1)
    np.testing.assert_array_equal(lens.target_ranks, ranks.numpy())
    assert (lens.target_ranks[lens.top_ids == np.array(IDS[1:])] == 1).all()


def test_entropy_and_similarity_are_the_formulas_on_transformers_attentions(hf_outputs):
    _, out = hf_outputs
    att = torch.stack(out.attentions)[:, 0].numpy()  # (n_layer, nh, T, T)
    p = torch.stack(out.attentions)[:, 0].double()
    entropy = -torch.special.xlogy(p, p).sum(-1)
    np.testing.assert_allclose(attention_entropy(att), entropy.numpy(), atol=1e-5)
    flat = torch.nn.functional.normalize(p[1].flatten(1), dim=1)
    np.testing.assert_allclose(head_similarity(att[1]), (flat @ flat.T).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.diag(head_similarity(att[0])), 1.0, atol=1e-6)


def test_without_sink_drops_the_first_key_and_renormalises():
    rows = np.array([[1.0, 0.0, 0.0], [0.8, 0.2, 0.0], [0.5, 0.3, 0.2]])
    np.testing.assert_allclose(without_sink(rows), [[0.0, 0.0], [1.0, 0.0], [0.6, 0.4]])
