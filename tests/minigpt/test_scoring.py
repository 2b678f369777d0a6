"""Scoring and comparing: perplexity (the CLI too), per-token diff and KL, against transformers and peft."""
import copy
import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import GPT2TokenizerFast

from minigpt import perplexity
from minigpt.inference import load_with_scale
from minigpt.scoring import ScoringError, compare_ids, score_ids, windows
from tests.helpers.app_server import make_adapter

TEXT = ("The quick brown fox jumps over the lazy dog. Instruction tuning teaches a language model to follow "
        "requests; perplexity measures how surprised it is by a text. Café, naïve, 東京 and 🙂 are bytes too. ") * 4


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory):
    return make_adapter(tiny_checkpoint[0], tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def peft_model(tiny_checkpoint, adapter, scale=1.0):
    """The oracle for the tuned model: peft running the adapter unmerged, its scaling multiplied by scale."""
    model = PeftModel.from_pretrained(copy.deepcopy(tiny_checkpoint[1]), adapter).eval()
    for module in model.modules():
        if isinstance(getattr(module, "scaling", None), dict):
            module.scaling = {k: v * scale for k, v in module.scaling.items()}
    return model


def transformers_perplexity(model, ids, max_length, stride):
    """transformers' perplexity guide, loss from labels, counting the tokens each window really scores."""
    nll_sum, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        input_ids = torch.tensor([ids[begin:end]])
        target_ids = input_ids.clone()
        target_ids[:, :-(end - previous_end)] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum, count, previous_end = nll_sum + float(loss) * scored, count + scored, end
        if end == len(ids):
            break
    return {"perplexity": math.exp(nll_sum / count), "nll": nll_sum / count, "tokens": count}


def run_cli(capsys, *argv):
    assert perplexity.main([*map(str, argv), "--device", "cpu", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("max_length, stride", [(64, 24), (64, 64)])
@pytest.mark.parametrize("scale", [None, 1.0, 0.5])
def test_cli_perplexity_equals_transformers_windows(tiny_checkpoint, adapter, text_file, capsys, max_length, stride,
                                                    scale):
    folder, hf_model = tiny_checkpoint
    ids = GPT2TokenizerFast.from_pretrained(folder)(TEXT).input_ids
    assert len(ids) > 2 * max_length  # several windows
    oracle = hf_model if scale is None else peft_model(tiny_checkpoint, adapter, scale)
    expected = transformers_perplexity(oracle, ids, max_length, stride)
    extra = [] if scale is None else ["--adapter", adapter, "--lora-scale", scale]
    got = run_cli(capsys, "--model", folder, "--file", text_file, "--max-length", max_length, "--stride", stride, *extra)
    # stride < max-length: every token but the first; disjoint windows: not the first of each window either
    n_windows = len(windows(len(ids), max_length, stride))
    assert got["tokens"] == expected["tokens"] == len(ids) - (1 if stride < max_length else n_windows)
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    assert got["nll"] == pytest.approx(expected["nll"], rel=1e-4)


@pytest.mark.parametrize("precision", ["int4", "int8", "float32"])
def test_cli_kl_base_is_the_kl_from_float32_over_the_scored_positions(tiny_checkpoint, text_file, capsys, precision):
    """--kl-base float32: KL(float32 || this precision) and top-1 agreement at every scored position. Oracle:
    both models' logits window by window (the float32 model equals transformers': test_weights), through
    torch's kl_div."""
    folder = tiny_checkpoint[0]
    ids = GPT2TokenizerFast.from_pretrained(folder)(TEXT).input_ids
    model, base = (load_with_scale(folder, None, "cpu", p)[0] for p in (precision, "float32"))
    kl, same = [], []
    for begin, end, first in windows(len(ids), 64, 24):
        with torch.inference_mode():
            window = torch.tensor([ids[begin:end]])
            logp = model(window)[0, first - begin - 1:end - begin - 1].float().log_softmax(-1)
            logp_base = base(window)[0, first - begin - 1:end - begin - 1].log_softmax(-1)
        kl += torch.nn.functional.kl_div(logp, logp_base, log_target=True, reduction="none").sum(-1).tolist()
        same += (logp.argmax(-1) == logp_base.argmax(-1)).tolist()
    got = run_cli(capsys, "--model", folder, "--file", text_file, "--max-length", 64, "--stride", 24,
                  "--precision", precision, "--kl-base", "float32")
    assert len(kl) == got["tokens"] == len(ids) - 1
    assert got["kl_base"] == "float32" and got["precision"] == precision
    assert got["kl_mean"] == pytest.approx(sum(kl) / len(kl), rel=1e-3, abs=1e-7)
    assert got["kl_max"] == pytest.approx(max(kl), rel=1e-3, abs=1e-7)
    assert got["top1_agreement"] == sum(same) / len(same)
    if precision == "float32":
        assert got["kl_mean"] == 0 and got["top1_agreement"] == 1
    else:  # quantized: a cost that shows
        assert got["kl_mean"] > 1e-7


def test_windows_score_each_token_once_with_some_context():
    for n, max_length, stride in [(10, 4, 1), (10, 4, 3), (3, 8, 8), (100, 16, 7)]:
        scored = [i for _, end, first in windows(n, max_length, stride) for i in range(first, end)]
        assert scored == list(range(1, n))  # overlapping windows: every token but the text's first
    scored = [i for _, end, first in windows(10, 4, 4) for i in range(first, end)]
    assert scored == [1, 2, 3, 5, 6, 7, 9]  # disjoint windows: a window's first token has no context in it


@pytest.mark.parametrize("argv, message", [
    (["--file", "{missing}"], "cannot read"),
    (["--file", "{latin1}"], "as UTF-8"),
    (["--file", "{short}"], "scoring needs at least 2"),
    (["--file", "{text}", "--stride", "0"], "stride must be between 1 and max-length"),
    (["--file", "{text}", "--stride", "65", "--max-length", "64"], "stride must be between 1 and max-length (64)"),
    (["--file", "{text}", "--max-length", "1000"], "longer than the model's context (128)"),
    (["--file", "{text}", "--lora-scale", "0.5"], "--lora-scale scales an adapter"),
    (["--file", "{text}", "--lora-scale", "3", "--adapter", "{adapter}"], "between 0 and 2"),
])
def test_bad_input_is_one_error_line_and_status_2(tiny_checkpoint, adapter, text_file, tmp_path, capsys, argv,
                                                   message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "short.txt").write_text("Hi")  # one token
    paths = {"missing": tmp_path / "none.txt", "latin1": tmp_path / "latin1.txt", "short": tmp_path / "short.txt",
             "text": text_file, "adapter": adapter}
    argv = [a.format(**paths) for a in argv]
    assert perplexity.main(["--model", str(tiny_checkpoint[0]), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_compare_equals_transformers_and_peft_logits(tiny_checkpoint, adapter):
    folder, hf_model = tiny_checkpoint
    base, scale, tokenizer = load_with_scale(folder, adapter, "cpu", "float32")
    ids = tokenizer.encode_ordinary(TEXT)[:60]
    start = 20
    got = compare_ids(base, scale.tuned, ids, start)
    with torch.no_grad():
        logp_base = hf_model(torch.tensor([ids])).logits[0].log_softmax(-1)[start - 1:-1]
        logp_tuned = peft_model(tiny_checkpoint, adapter)(torch.tensor([ids])).logits[0].log_softmax(-1)[start - 1:-1]
    targets = torch.tensor(ids[start:])[:, None]
    expected_base, expected_tuned = logp_base.gather(1, targets)[:, 0], logp_tuned.gather(1, targets)[:, 0]
    kl = torch.nn.functional.kl_div(logp_base, logp_tuned, log_target=True, reduction="none").sum(-1)
    assert [t.token_id for t in got.tokens] == ids[start:]
    torch.testing.assert_close(torch.tensor([t.logprob_base for t in got.tokens]), expected_base, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor([t.logprob_tuned for t in got.tokens]), expected_tuned, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor([t.diff for t in got.tokens]), expected_tuned - expected_base,
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor([t.kl for t in got.tokens]), kl, rtol=1e-3, atol=1e-5)
    assert [[i for i, _ in t.top_base] for t in got.tokens] == logp_base.topk(5).indices.tolist()
    assert [[i for i, _ in t.top_tuned] for t in got.tokens] == logp_tuned.topk(5).indices.tolist()
    changed = (logp_base.argmax(-1) != logp_tuned.argmax(-1)).nonzero()[:, 0].tolist()
    assert changed, "the random adapter changes the top-1 token somewhere"
    ranked = got.changed_minds()
    assert sorted(t.position - 1 for t in ranked) == changed
    assert [t.kl for t in ranked] == sorted((t.kl for t in ranked), reverse=True)
    assert got.mean_logprob_base == pytest.approx(float(expected_base.mean()), abs=1e-4)
    assert got.mean_logprob_tuned == pytest.approx(float(expected_tuned.mean()), abs=1e-4)


def test_score_ids_and_compare_refuse_what_they_cannot_score(tiny_model):
    model = tiny_model[0]
    with pytest.raises(ScoringError, match="at least 2"):
        score_ids(model, [464])
    with pytest.raises(ScoringError, match="nothing to compare"):
        compare_ids(model, model, [464, 2068], 2)
