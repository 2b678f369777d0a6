"""The loader: both key styles, the Hub cache offline, and a specific error for every broken checkpoint."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt import CheckpointError, load_pretrained
from tests.helpers import REPO as ROOT
from tests.helpers import generate_cli as cli


@pytest.fixture
def checkpoint(tmp_path, tiny_checkpoint):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[0], folder)
    return folder


def rewrite(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_official_layout_has_no_prefix_and_mask_buffers(tiny_checkpoint):
    keys = load_file(tiny_checkpoint[0] / "model.safetensors").keys()
    assert "wte.weight" in keys and "h.0.attn.bias" in keys and "lm_head.weight" not in keys


def test_lm_head_is_tied_and_conv1d_weights_are_transposed(tiny_model):
    model, _, hf_model = tiny_model
    assert model.lm_head.weight is model.transformer.wte.weight
    hf = hf_model.state_dict()
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, hf["transformer.h.0.attn.c_attn.weight"].t())
    assert torch.equal(model.transformer.h[1].mlp.c_proj.weight, hf["transformer.h.1.mlp.c_proj.weight"].t())


def test_dtype_and_device_are_applied(tiny_checkpoint):
    model, _ = load_pretrained(tiny_checkpoint[0], device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    assert model.transformer.h[0].mlp.c_fc.weight.is_contiguous()


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("h.1.mlp.c_fc.weight"), "missing tensor transformer.h.1.mlp.c_fc.weight"),
    (lambda t: t.update({"h.0.attn.extra": torch.zeros(3)}), "unexpected tensor transformer.h.0.attn.extra"),
    (lambda t: t.update({"h.1.mlp.c_fc2.weight": t.pop("h.1.mlp.c_fc.weight")}), "missing tensor transformer.h.1.mlp.c_fc.weight"),
    (lambda t: t.update({"ln_f.weight": torch.ones(65)}), r"tensor transformer.ln_f.weight has shape \(65,\), expected \(64,\)"),
    (lambda t: t.update({"h.0.attn.c_attn.weight": torch.zeros(192, 64)}), r"transformer.h.0.attn.c_attn.weight has shape \(64, 192\)"),
    (lambda t: t["h.1.mlp.c_proj.weight"].view(-1).__setitem__(7, float("nan")),
     "tensor transformer.h.1.mlp.c_proj.weight holds NaN or infinite values: the checkpoint is damaged"),
    (lambda t: t["wte.weight"].view(-1).__setitem__(0, float("-inf")), "tensor transformer.wte.weight holds NaN or inf"),
])
def test_wrong_tensors_are_named(checkpoint, edit, message):
    rewrite(checkpoint, edit)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(checkpoint, device="cpu")


def test_truncated_file(checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(checkpoint, device="cpu")


def test_garbage_file(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(checkpoint, device="cpu")


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_pretrained(checkpoint, device="cpu")


def test_invalid_config(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="bad .*config.json"):
        load_pretrained(checkpoint, device="cpu")


def test_unsupported_activation(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="activation_function='relu'"):
        load_pretrained(checkpoint, device="cpu")


def test_pickle_only_checkpoint_is_refused(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_pretrained(checkpoint, device="cpu")


def test_unknown_repo_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="neither a local folder nor in the Hugging Face cache"):
        load_pretrained("nobody-here/no-such-gpt2", device="cpu")


def fake_hub_cache(hf_home: Path, repo_id: str, source: Path) -> None:
    """Lay out a snapshot exactly as huggingface_hub's cache does (models--org--name/snapshots/<rev>)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(source, repo / "snapshots" / revision)


@pytest.mark.parametrize("speculative", [[], ["--speculative"]], ids=["one token a step", "speculative"])
def test_cli_streams_the_greedy_continuation(tiny_model, tiny_checkpoint, speculative):
    model, tokenizer, hf_model = tiny_model
    prompt = "Once upon a time"
    ids = tokenizer.encode_ordinary(prompt)
    expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(ids):].tolist()
    run = cli("--model", str(tiny_checkpoint[0]), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0",
              "--device", "cpu", *speculative)
    assert run.returncode == 0, run.stderr
    assert run.stdout == prompt + tokenizer.decode(expected) + "\n"
    assert re.fullmatch(r"\[12 tokens · first after \d+\.\d\d s · \d+\.\d tokens/s\]", run.stderr.splitlines()[-1])


def test_cli_uses_the_hub_cache_offline(tmp_path, tiny_checkpoint):
    fake_hub_cache(tmp_path, "openai-community/gpt2", tiny_checkpoint[0])
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}  # read when huggingface_hub is imported
    run = subprocess.run([sys.executable, "-m", "minigpt.generate", "--model", "gpt2", "--prompt", "Hi",
                          "--max-new-tokens", "3", "--seed", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Hi")


def test_cli_interactive_mode(tiny_checkpoint):
    run = subprocess.run([sys.executable, "-m", "minigpt.generate", "--model", str(tiny_checkpoint[0]),
                          "--interactive", "--max-new-tokens", "4", "--temperature", "0"],
                         cwd=ROOT, input="Hello\nWorld\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("> ") == 3 and len(run.stdout.splitlines()) >= 2


CLI_ERRORS = {  # a command line after --model ({ckpt}: a tiny checkpoint), and what its one error line says
    ("nobody-here/no-such-gpt2",): "neither a local folder nor in the Hugging Face cache",
    ("{ckpt}", "--temperature", "-1"): "--temperature must be",
    ("{ckpt}", "--top-p", "0"): "--top-p must be",
    ("{ckpt}", "--max-new-tokens", "0"): "--max-new-tokens must be",
    ("{ckpt}", "--seed", "-1"): "--seed must be",
    ("{ckpt}", "--lora-scale", "0.5"): "--lora-scale scales an adapter",
    ("{ckpt}", "--dtype", "int8", "--speculative"): "already int8",
    ("{ckpt}", "--precision", "int4", "--speculative"): "already int8 or int4",
    ("{ckpt}", "--device", "gpu"): "error: unknown device 'gpu': use cuda, mps or cpu",
    **({} if torch.cuda.is_available() else {("{ckpt}", "--device", "cuda"): "error: device 'cuda': CUDA is not "
                                                                             "available here"}),
}


@pytest.mark.parametrize("args", CLI_ERRORS, ids=" ".join)
def test_cli_errors_are_one_line_without_traceback(tiny_checkpoint, args):
    run = cli("--model", *[a.format(ckpt=tiny_checkpoint[0]) for a in args])  # the pytest process: HF_HUB_OFFLINE=1
    assert run.returncode == 2 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and CLI_ERRORS[args] in lines[0], run.stderr


def test_cli_reports_a_broken_checkpoint(checkpoint):
    rewrite(checkpoint, lambda t: t.pop("wpe.weight"))
    run = cli("--model", str(checkpoint))
    assert run.returncode == 2 and run.stderr.strip() == "error: checkpoint is missing tensor transformer.wpe.weight"


@pytest.mark.parametrize("name, repo_id", [("gpt2", "openai-community/gpt2"), ("gpt2-xl", "openai-community/gpt2-xl"),
                                           ("someone/my-gpt2", "someone/my-gpt2")])
def test_hub_names_fetch_only_the_four_snapshot_files(monkeypatch, tiny_checkpoint, name, repo_id):
    calls = []

    def fake_snapshot_download(repo, allow_patterns):
        calls.append((repo, sorted(allow_patterns)))
        return str(tiny_checkpoint[0])

    monkeypatch.setattr("minigpt.hub.snapshot_download", fake_snapshot_download)
    load_pretrained(name, device="cpu")
    assert calls == [(repo_id, ["config.json", "merges.txt", "model.safetensors", "vocab.json"])]


def test_a_name_too_long_for_a_path_is_a_clear_error():
    with pytest.raises(CheckpointError, match=r"no model folder 'x{300}' \(nor is it a Hub repo id\)"):
        load_pretrained("x" * 300, device="cpu")


def test_weights_of_a_non_float_dtype_are_refused(checkpoint):
    """The float32 bytes relabelled I32: loading them would convert integers and generate garbage."""
    rewrite(checkpoint, lambda t: t.update({"h.1.mlp.c_fc.weight": t["h.1.mlp.c_fc.weight"].view(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"tensor transformer.h.1.mlp.c_fc.weight is stored as I32; "
                                              r"weights must be floating point \(F32, F16, BF16\)"):
        load_pretrained(checkpoint, device="cpu")


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "n_head": 0}, "n_head must be between 1 and 1,024, got 0"),
    (lambda c: {**c, "n_embd": -64}, "n_embd must be between 1"),
    (lambda c: {**c, "n_layer": "2"}, "n_layer must be a whole number, got '2'"),
    (lambda c: {**c, "n_positions": 1e9}, "n_positions must be a whole number"),
    (lambda c: {**c, "n_positions": 10**9}, "n_positions must be between 1 and 65,536"),
    (lambda c: {**c, "n_layer": 10**6}, "n_layer must be between 1 and 1,024"),
    (lambda c: {**c, "n_layer": 1000, "n_embd": 16384, "n_head": 64}, "refusing anything over 20 billion"),
    (lambda c: {**c, "layer_norm_epsilon": None}, "layer_norm_epsilon must be a number"),
    (lambda c: [c], "config.json must hold a JSON object, found list"),
    (lambda c: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_a_bad_config_is_refused_before_anything_is_built(checkpoint, edit, message):
    edited = edit(json.loads((checkpoint / "config.json").read_text()))
    (checkpoint / "config.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(CheckpointError, match=f"bad .*config.json: .*{re.escape(message)}"):
        load_pretrained(checkpoint, device="cpu")


def test_interactive_mode_has_line_editing(tiny_checkpoint, monkeypatch, capsys):
    generate = __import__("minigpt.generate", fromlist=["main"])
    pytest.importorskip("readline")
    monkeypatch.delitem(sys.modules, "readline", raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: (_ for _ in ()).throw(EOFError))
    assert generate.main(["--model", str(tiny_checkpoint[0]), "--device", "cpu", "--interactive"]) == 0
    assert "readline" in sys.modules


@pytest.mark.parametrize("module, expected", [
    ("minigpt.generate", ["(default: 100)", "(default: 0.8)", "(default: 50)", "(default: 0.95)",
                          "(default: float32)"]),
    ("lora.train", ["(default: 0.0003 for LoRA, 3e-05 with --full)", "(default: 8)", "(default: 16)", "(default: 0.05)", "(default: 512)"]),
])
def test_cli_help_shows_the_defaults(capsys, module, expected):
    parse_args = __import__(module, fromlist=["parse_args"]).parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help = " ".join(capsys.readouterr().out.split())
    assert all(default in help for default in expected)


def test_loading_a_checkpoint_leaves_torch_dynamo_unimported(tiny_checkpoint):
    """Building the model to load into skips the random init, whose normal_ on the meta device imports
    torch._dynamo (2.3 s of every start that loads a checkpoint)."""
    code = ("import sys; from minigpt import load_pretrained; "
            f"load_pretrained({str(tiny_checkpoint[0])!r}, device='cpu'); print('torch._dynamo' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.stdout.split() == ["False"], run.stderr
