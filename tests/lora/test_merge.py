"""python -m lora.merge against peft's merge_and_unload, through transformers loading the written folder."""
import copy
import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import GPT2LMHeadModel

from lora.merge import main
from minigpt.adapters import CONFIG_FILE
from tests.helpers.checkpoints import make_checkpoint
from tests.lora.test_layer import peft_twin, tokens


@pytest.fixture(scope="module")
def peft_adapter(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft-adapter")
    peft_twin(tiny_model, ["c_attn", "c_proj", "c_fc"], r=4, alpha=8, seed=3)[1].save_pretrained(folder)
    return folder


def peft_merged_logits(hf_model, adapter, ids):
    merged = PeftModel.from_pretrained(copy.deepcopy(hf_model), adapter).merge_and_unload().eval()
    with torch.no_grad():
        return merged(ids).logits


def written_logits(folder, ids):
    with torch.no_grad():
        return GPT2LMHeadModel.from_pretrained(folder).eval()(ids).logits


def test_the_merged_folder_loads_in_transformers_as_peft_merges_it(tiny_checkpoint, tiny_model, peft_adapter, tmp_path):
    folder, hf_model = tiny_checkpoint
    out = tmp_path / "merged"
    assert main(["--model", str(folder), "--adapter", str(peft_adapter), "--out", str(out)]) == 0
    ids = tokens(batch=2, length=16)
    expected = peft_merged_logits(hf_model, peft_adapter, ids)
    torch.testing.assert_close(written_logits(out, ids), expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (hf_model(ids).logits - expected).abs().max() > 1e-2  # the adapter changes the model


def test_scale_multiplies_the_update(tiny_checkpoint, peft_adapter, tmp_path):
    folder, hf_model = tiny_checkpoint
    assert main(["--model", str(folder), "--adapter", str(peft_adapter), "--out", str(tmp_path / "half"),
                 "--scale", "0.5"]) == 0
    halved = tmp_path / "halved-adapter"  # the oracle: the same adapter with half its lora_alpha
    shutil.copytree(peft_adapter, halved)
    config = json.loads((halved / CONFIG_FILE).read_text())
    config["lora_alpha"] /= 2
    (halved / CONFIG_FILE).write_text(json.dumps(config))
    ids = tokens(batch=1, length=10, seed=4)
    torch.testing.assert_close(written_logits(tmp_path / "half", ids), peft_merged_logits(hf_model, halved, ids),
                               rtol=0, atol=1e-5)


def test_bad_merges_are_one_line_errors(tiny_checkpoint, peft_adapter, tmp_path, capsys):
    folder, _ = tiny_checkpoint
    assert main(["--model", str(folder), "--adapter", str(peft_adapter), "--out", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {folder} already holds a model: choose another --out"
    wider, _ = make_checkpoint(tmp_path / "wider", n_embd=128)
    assert main(["--model", str(wider), "--adapter", str(peft_adapter), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: adapter expects ") and "another base model" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
