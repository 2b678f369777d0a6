"""The token cache: a text tokenized chunk by chunk equals tiktoken on the whole text; made once, then mapped."""
import torch

from minigpt.token_cache import cache_path, cached_tokens, chunks, write_tokens
from minigpt.tokenizer import load_tokenizer
from tests.helpers.checkpoints import write_tokenizer

# whitespace runs GPT-2's pre-tokenizer treats specially: "\n\n" is one token, " \n" another, "  x" keeps a space
TRICKY = ("First line.\nSecond  line,\n\nafter a blank.\n \nspace-newline\n\n\n  indented\tword's 12 345\n"
          "über café — ünïcode 😀\nlast")


def tokenizer_folder(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    write_tokenizer(folder)
    return folder


def test_tokens_of_the_chunks_are_the_tokens_of_the_whole_text(tmp_path):
    folder = tokenizer_folder(tmp_path)
    tokenizer = load_tokenizer(folder)
    text = tmp_path / "t.txt"
    text.write_text(TRICKY * 40, encoding="utf-8")
    for size in (7, 50, 333):  # far smaller than the text: many cuts
        pieces = list(chunks(text, size))
        assert len(pieces) > 5 and "".join(pieces) == TRICKY * 40
        write_tokens(text, tokenizer, tmp_path / f"{size}.int32", chunk_chars=size)
        ours = torch.from_file(str(tmp_path / f"{size}.int32"), size=(tmp_path / f"{size}.int32").stat().st_size // 4,
                               dtype=torch.int32)
        assert ours.tolist() == tokenizer.encode_ordinary(TRICKY * 40)


def test_the_cache_is_made_once_and_follows_the_text(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    folder = tokenizer_folder(tmp_path)
    tokenizer = load_tokenizer(folder)
    text = tmp_path / "t.txt"
    text.write_text("Hello there.\nGeneral Kenobi.\n", encoding="utf-8")
    tokens, made = cached_tokens(text, tokenizer, folder, build=True)
    assert made and tokens.tolist() == tokenizer.encode_ordinary(text.read_text())
    again, made = cached_tokens(text, tokenizer, folder, build=True)
    assert not made and torch.equal(again, tokens)  # mapped from the file, not tokenized again
    text.write_text("Something else.\n", encoding="utf-8")
    assert cache_path(text, folder).name != next((tmp_path / "cache" / "tokens").iterdir()).name
    changed, made = cached_tokens(text, tokenizer, folder, build=True)
    assert made and changed.tolist() == tokenizer.encode_ordinary("Something else.\n")
