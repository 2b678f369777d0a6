"""Pre-training a tiny GPT-2 from scratch on a self-written text; its folder against transformers."""
import json
import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from minigpt import load_pretrained
from minigpt.pretrain import main
from tests.helpers import without_timings
from tests.helpers.checkpoints import write_tokenizer

pytestmark = pytest.mark.slow  # hundreds of training steps

LINES = [
    "The old lighthouse keeper climbed the stairs each evening to light the lamp.",
    "The ships at sea watched for the light and steered away from the rocks.",
    "When the storm came, the keeper stayed awake all night beside the lamp.",
    "In the morning the sea was calm and the fishing boats came home.",
]


def test_a_model_pretrained_from_scratch_learns_and_loads_in_transformers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tokenizer").mkdir()
    write_tokenizer(tmp_path / "tokenizer")
    text = tmp_path / "story.txt"
    text.write_text("\n".join(LINES * 30), encoding="utf-8")
    out = tmp_path / "my-gpt"
    assert main(["--text", str(text), "--out", str(out), "--tokenizer", str(tmp_path / "tokenizer"),
                 "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
                 "--max-steps", "150", "--lr", "1e-2", "--val-fraction", "0.1", "--eval-every", "75",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "parameters: " in err and "plan: steps 1-150 (--max-steps)" in err
    assert "(tokenized into the token cache)" in err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in val] == [75, 150]
    assert val[-1]["val_loss"] < 0.5 * math.log(50257)  # uniform guessing: ln 50257 = 10.8
    assert val[-1]["val_perplexity"] == math.exp(val[-1]["val_loss"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        assert (out / name).is_file()

    ours, tokenizer = load_pretrained(out, device="cpu")
    theirs = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.tensor([tokenizer.encode_ordinary(" ".join(LINES))[:16]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-5)

    # continued pre-training from that folder: it starts where the first run ended, not from ln 50257
    again = tmp_path / "continued"
    assert main(["--text", str(text), "--out", str(again), "--init-from", str(out), "--block-size", "16",
                 "--batch-size", "4", "--max-steps", "3", "--lr", "1e-4", "--val-fraction", "0.1",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "(read from the token cache)" in err and f"context 16), from {out}" in err
    first = [r["loss"] for r in log if "loss" in r]
    continued = [json.loads(line) for line in (again / "log.jsonl").read_text().splitlines()]
    assert first[0] > 10 and continued[0]["loss"] < 0.5 * math.log(50257)
    assert GPT2LMHeadModel.from_pretrained(again).config.n_layer == 2


def test_init_from_takes_the_shape_from_the_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--text", "x.txt", "--out", str(tmp_path), "--init-from", "gpt2", "--n-layer", "4"])
    assert exit.value.code == 2
    assert "--n-layer: the shape and tokenizer come from --init-from gpt2" in capsys.readouterr().err


def test_two_processes_share_one_token_cache_and_train_like_one(tmp_path, monkeypatch):
    """torchrun (gloo, 2 processes x batch 2 x accumulation 2) against 1 process x batch 8: rank 0 tokenizes
    into the cache while rank 1 waits and maps it; the losses and weights are those of the single process."""
    from safetensors.torch import load_file

    from tests.lora.test_distributed import torchrun
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))  # inherited by the torchrun processes
    (tmp_path / "tokenizer").mkdir()
    write_tokenizer(tmp_path / "tokenizer")
    text = tmp_path / "story.txt"
    text.write_text("\n".join(LINES * 10), encoding="utf-8")
    common = ["--text", str(text), "--tokenizer", str(tmp_path / "tokenizer"), "--n-layer", "1", "--n-head", "2",
              "--n-embd", "16", "--block-size", "8", "--max-steps", "3", "--lr", "1e-2", "--val-fraction", "0.1",
              "--eval-examples", "1000", "--device", "cpu"]  # every held-out window: the default cap is timed
    two = torchrun(["minigpt.pretrain", *common, "--out", str(tmp_path / "two"), "--batch-size", "2",
                    "--grad-accum", "2"])
    assert two.stderr.count("(tokenized into the token cache)") == 1
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "8"]) == 0

    def scores(out):
        return without_timings([json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()])
    for r1, r2 in zip(scores(tmp_path / "one"), scores(tmp_path / "two"), strict=True):
        assert r1.keys() == r2.keys() and all(r2[k] == pytest.approx(r1[k], rel=1e-4) for k in r1)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-5, msg=key)
