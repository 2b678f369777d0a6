"""Weights moved to huge pages: the same numbers, the same sharing and ties, in memory Linux backs with 2 MB pages.

Oracles: the model before the move (logits equal bit for bit) and the kernel's own account of the memory
(/proc/self/smaps: the mapping that holds the weights is eligible for huge pages).
"""
import copy
from pathlib import Path

import pytest
import torch

from minigpt.inference import load_with_scale
from minigpt.speed import hugepages
from minigpt.speed.hugepages import move_to_huge_pages
from minigpt.speed.quantize import quantize_int8
from tests.helpers.app_server import make_adapter


def smaps_field(address: int, field: str) -> str:
    """The value of field (e.g. "THPeligible") for the memory mapping that holds address."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise LookupError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("precision", ["float32", "int8"])
@torch.inference_mode()
def test_moving_keeps_the_logits_ties_and_parameters(tiny_model, precision):
    model = copy.deepcopy(tiny_model[0])
    if precision == "int8":
        quantize_int8(model)
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    expected = model(ids)
    parameters = list(model.parameters())
    before = {name: t.data_ptr() for name, t in model.state_dict().items()}

    moved = move_to_huge_pages(model)

    assert torch.equal(model(ids), expected)
    assert list(model.parameters()) == parameters  # the same Parameter objects, their data moved
    if precision == "float32":
        assert model.lm_head.weight is model.transformer.wte.weight
    else:
        assert model.transformer.wte.lm_head is model.lm_head
    after = {name: t.data_ptr() for name, t in model.state_dict().items()}
    if not hugepages.huge_pages_offered():
        assert moved == 0 and after == before
        return
    assert moved >= sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.numel()) // 2
    assert all(after[name] != before[name] for name in after if model.state_dict()[name].numel())
    assert smaps_field(model.lm_head.weight.data_ptr(), "THPeligible") == "1"


def test_a_base_and_its_tuned_model_still_share_every_weight_but_the_targets(tiny_checkpoint, tmp_path):
    adapter = make_adapter(tiny_checkpoint[0], tmp_path)
    for precision in ("float32", "int8"):
        scale = load_with_scale(tiny_checkpoint[0], adapter, "cpu", precision)[1]
        base, tuned = scale.base.model.state_dict(), scale.tuned.model.state_dict()
        for key, tensor in tuned.items():
            targeted = ".c_attn." in key and not key.endswith("bias")
            assert (tensor.data_ptr() == base[key].data_ptr()) != targeted, (precision, key)
        if hugepages.huge_pages_offered():
            assert smaps_field(base["lm_head.weight"].data_ptr(), "THPeligible") == "1"


def test_where_huge_pages_are_off_nothing_moves(tiny_model, monkeypatch):
    model = copy.deepcopy(tiny_model[0])
    monkeypatch.setattr(hugepages, "huge_pages_offered", lambda: False)
    before = [p.data_ptr() for p in model.parameters()]
    assert move_to_huge_pages(model) == 0
    assert [p.data_ptr() for p in model.parameters()] == before
