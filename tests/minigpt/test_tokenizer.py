"""Our tiktoken Encoding against transformers' GPT2TokenizerFast on the real GPT-2 vocabulary."""
import json

import pytest
from transformers import GPT2TokenizerFast

from minigpt import CheckpointError
from minigpt.tokenizer import load_tokenizer
from tests.helpers.checkpoints import write_tokenizer

CORPUS = [
    "Hello, world! It's a test: we're done, they'll see, I've been, he'd go.",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 1,000,000",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n\n\nclass A: pass\n",
    "    leading spaces\t\ttabs   and   runs     \n\n\n   \r\n trailing   ",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "emoji 🎉🔥👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷 and ✓ ✗ →",
    "Café naïve résumé São Paulo Zürich Ångström Œuvre ß ﬁ",
    "Before<|endoftext|>After <|endoftext|> spaced",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "",
    " ",
    "URL https://example.com/path?q=1&r=2#frag e-mail a.b@c.de",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    write_tokenizer(folder)
    return load_tokenizer(folder), GPT2TokenizerFast.from_pretrained(folder)


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_transformers_and_round_trip(tokenizers, text):
    ours, theirs = tokenizers
    ids = ours.encode(text, allowed_special="all")
    assert ids == theirs(text)["input_ids"]
    assert ours.decode(ids) == text


def test_endoftext_is_50256_and_typed_text_stays_text(tokenizers):
    ours, _ = tokenizers
    assert ours.eot_token == 50256 and ours.n_vocab == 50257
    assert ours.encode("<|endoftext|>", allowed_special="all") == [50256]
    typed = ours.encode_ordinary("<|endoftext|>")
    assert 50256 not in typed and ours.decode(typed) == "<|endoftext|>"


def test_missing_tokenizer_file_is_named(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer file merges.txt"):
        load_tokenizer(tmp_path)


def test_vocab_and_merges_that_disagree_are_refused(tmp_path):
    write_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab["Ġthe"], vocab["Ġand"] = vocab["Ġand"], vocab["Ġthe"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match="disagree"):
        load_tokenizer(tmp_path)
