"""PEFT-format adapter files both ways, the per-call serving path (load_tuned_model), and adapter errors."""
import copy
import json
import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from lora import (
    AdapterConfig,
    AdapterError,
    alpaca_prompt,
    load_tuned_model,
    save_adapter,
)
from minigpt import CheckpointError, SamplingParams, generate, load_pretrained
from minigpt.adapters import CONFIG_FILE, WEIGHTS_FILE
from tests.helpers.checkpoints import make_checkpoint
from tests.lora.test_layer import peft_twin, tokens


@pytest.fixture(scope="module")
def twin(tiny_model):
    """(our injected model, peft model, peft adapter folder) with the same non-zero adapter on c_attn + c_fc."""
    return peft_twin(tiny_model, ["c_attn", "c_fc"], r=4, alpha=8, seed=5)


@pytest.fixture(scope="module")
def peft_folder(twin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft-adapter")
    twin[1].save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def our_folder(twin, tmp_path_factory):
    return save_adapter(twin[0], tmp_path_factory.mktemp("our-adapter"), AdapterConfig(4, 8, 0.0, ["c_attn", "c_fc"]))


def test_our_adapter_loads_in_peft_with_the_same_logits(tiny_model, twin, our_folder):
    config = json.loads((our_folder / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    assert all(k.startswith("base_model.model.transformer.h.") for k in load_file(our_folder / WEIGHTS_FILE))
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_model[2]), our_folder).eval()
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=idx).logits, twin[0](idx), rtol=0, atol=1e-5)


def test_peft_adapter_loads_here_with_the_same_logits(tiny_model, twin, peft_folder):
    base = tiny_model[0]
    tuned = load_tuned_model(base, peft_folder)
    idx = tokens(seed=7)
    with torch.no_grad():
        expected = twin[1](input_ids=idx).logits
        torch.testing.assert_close(tuned(idx), expected, rtol=0, atol=1e-5)
        assert (base(idx) - expected).abs().max() > 1e-2


def test_tuned_model_shares_everything_but_the_targets_and_leaves_base_alone(tiny_model, peft_folder):
    base = tiny_model[0]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = load_tuned_model(base, peft_folder)
    for key, tensor in tuned.state_dict().items():
        shared = tensor.data_ptr() == base.state_dict()[key].data_ptr()
        assert shared != key.endswith(("attn.c_attn.weight", "mlp.c_fc.weight")), key
    assert tuned.lm_head.weight is tuned.transformer.wte.weight
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_bfloat16_base_is_merged_in_float32_and_cast_back(tiny_checkpoint, peft_folder):
    base16, _ = load_pretrained(tiny_checkpoint[0], device="cpu", dtype=torch.bfloat16)
    tuned16 = load_tuned_model(base16, peft_folder)
    state = load_file(peft_folder / WEIGHTS_FILE)
    prefix = "base_model.model.transformer.h.1.attn.c_attn"
    delta = state[f"{prefix}.lora_B.weight"] @ state[f"{prefix}.lora_A.weight"] * (8 / 4)
    expected = (base16.transformer.h[1].attn.c_attn.weight.float() + delta).to(torch.bfloat16)
    assert torch.equal(tuned16.transformer.h[1].attn.c_attn.weight, expected)
    assert tuned16(tokens()).dtype == torch.bfloat16


def test_base_and_tuned_requests_interleaved_on_two_threads(tiny_model, peft_folder):
    base, tokenizer, _ = tiny_model
    tuned = load_tuned_model(base, peft_folder)
    prompt = tokenizer.encode_ordinary("The adapter question is")
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)

    def run(model, seed):
        return [e.token_id for e in generate(model, tokenizer, prompt, 24, params, seed=seed)]

    expected = {"base": run(base, 3), "tuned": run(tuned, 3)}
    assert expected["base"] != expected["tuned"]
    results = {"base": [], "tuned": []}
    barrier = threading.Barrier(2)  # both threads take each token step together, three requests each

    def worker(mode, model):
        for _ in range(3):
            events, got = generate(model, tokenizer, prompt, 24, params, seed=3), []
            for _ in range(24):
                barrier.wait(timeout=30)
                if (event := next(events, None)) is not None:
                    got.append(event.token_id)
            results[mode].append(got)

    threads = [threading.Thread(target=worker, args=("base", base)),
               threading.Thread(target=worker, args=("tuned", tuned))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {mode: [ids] * 3 for mode, ids in expected.items()}


def test_adapter_error_is_a_checkpoint_error():
    assert issubclass(AdapterError, CheckpointError)


def broken_copy(src, dst, config=None, tensors=None):
    dst.mkdir()
    data = json.loads((src / CONFIG_FILE).read_text())
    state = load_file(src / WEIGHTS_FILE)
    (dst / CONFIG_FILE).write_text(json.dumps(config(data) if config else data))
    save_file(tensors(state) if tensors else state, dst / WEIGHTS_FILE)
    return dst


CASES = {
    "missing config": (lambda d: (d / CONFIG_FILE).unlink(), r"missing adapter_config\.json in "),
    "missing weights": (lambda d: (d / WEIGHTS_FILE).unlink(), r"missing adapter_model\.safetensors in "),
    "corrupt json": (lambda d: (d / CONFIG_FILE).write_text("{ not json"), r"adapter_config\.json is not valid JSON"),
    "truncated weights": (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:100]),
                          r"adapter_model\.safetensors is truncated or corrupt"),
}


@pytest.mark.parametrize("case", CASES)
def test_broken_files_give_a_clear_error(tiny_model, peft_folder, tmp_path, case):
    damage, message = CASES[case]
    folder = broken_copy(peft_folder, tmp_path / "a")
    damage(folder)
    with pytest.raises(AdapterError, match=message):
        load_tuned_model(tiny_model[0], folder)


CONFIG_CASES = {
    "not lora": (lambda c: {**c, "peft_type": "IA3"}, r"peft_type is 'IA3'; only LORA"),
    "dora": (lambda c: {**c, "use_dora": True}, r"use_dora=True is not supported"),
    "rank pattern": (lambda c: {**c, "rank_pattern": {"c_fc": 2}}, r"rank_pattern=.* is not supported"),
    "bias": (lambda c: {**c, "bias": "all"}, r"bias='all' is not supported"),
    "bad r": (lambda c: {**c, "r": "four"}, r"r must be a positive integer, got 'four'"),
    "bad targets": (lambda c: {**c, "target_modules": 3}, r"target_modules must be"),
    "fewer targets": (lambda c: {**c, "target_modules": ["c_attn"]},
                      r"unexpected tensor transformer\.h\.0\.mlp\.c_fc\.lora_A\.weight, which target_modules"),
    "more targets": (lambda c: {**c, "target_modules": ["c_attn", "c_fc", "c_proj"]},
                     r"missing tensor transformer\.h\.0\.attn\.c_proj\.lora_A\.weight \(and 7 more\)"),
    "no match": (lambda c: {**c, "target_modules": ["q_proj"]}, r"selects no Linear module"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_invalid_config_gives_a_clear_error(tiny_model, peft_folder, tmp_path, case):
    change, message = CONFIG_CASES[case]
    folder = broken_copy(peft_folder, tmp_path / "a", config=change)
    with pytest.raises(AdapterError, match=message):
        load_tuned_model(tiny_model[0], folder)


def test_misshaped_tensor_is_named(tiny_model, peft_folder, tmp_path):
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    folder = broken_copy(peft_folder, tmp_path / "a", tensors=lambda s: {**s, key: s[key][:, :3].contiguous()})
    with pytest.raises(AdapterError, match=r"transformer\.h\.1\.attn\.c_attn have shapes \(4, 64\) and \(192, 3\)"):
        load_tuned_model(tiny_model[0], folder)


def test_adapter_for_another_base_shape_is_refused(tiny_model, tmp_path):
    model, _, _ = tiny_model
    _, wider = make_checkpoint(tmp_path / "wide", n_embd=96, n_head=4, n_layer=2)
    config = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    get_peft_model(wider, config).save_pretrained(tmp_path / "w")
    with pytest.raises(AdapterError, match=r"adapter expects transformer\.h\.0\.attn\.c_attn with in_features=96, "
                                           r"out_features=288, but the model has 64, 192 \(n_embd=64\)"):
        load_tuned_model(model, tmp_path / "w")
    _, deeper = make_checkpoint(tmp_path / "deep", n_layer=3)
    get_peft_model(deeper, config).save_pretrained(tmp_path / "d")
    with pytest.raises(AdapterError, match=r"unexpected tensor transformer\.h\.2\.attn\.c_attn\.lora_A\.weight, "
                                           r"a module this 2-layer model does not have"):
        load_tuned_model(model, tmp_path / "d")


def test_hub_adapter_loads_from_the_cache_offline(tiny_model, twin, peft_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.minigpt.test_weights import fake_hub_cache
    fake_hub_cache(tmp_path, "someone/tiny-gpt2-lora", peft_folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tuned = load_tuned_model(tiny_model[0], "someone/tiny-gpt2-lora")
    idx = tokens(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(tuned(idx), twin[1](input_ids=idx).logits, rtol=0, atol=1e-5)


def test_unknown_hub_adapter_offline_is_one_clear_line(tiny_model):
    with pytest.raises(AdapterError) as info:
        load_tuned_model(tiny_model[0], "someone/gpt2-lora-that-is-not-cached")
    message = str(info.value)
    assert "\n" not in message and "'someone/gpt2-lora-that-is-not-cached'" in message


def test_generate_cli_with_adapter_and_alpaca_template(tiny_model, tiny_checkpoint, twin, peft_folder, capsys):
    from minigpt.generate import main
    tokenizer = tiny_model[1]
    prompt = alpaca_prompt("Name a colour.")
    ids = tokenizer.encode_ordinary(prompt)
    expected = twin[1].generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert main(["--model", str(tiny_checkpoint[0]), "--adapter", str(peft_folder), "--alpaca", "--prompt",
                 "Name a colour.", "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == prompt + tokenizer.decode(expected) + "\n"
    assert main(["--model", str(tiny_checkpoint[0]), "--adapter", str(peft_folder / "nope"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"error: no adapter folder '{peft_folder / 'nope'}' (nor is it a Hub repo id)\n"
