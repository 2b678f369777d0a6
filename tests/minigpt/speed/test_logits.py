"""Reading a row of logits in C (minigpt/speed/logits.py): every variant of this CPU against PyTorch's argmax,
log_softmax and topk, and the PyTorch path it falls back to."""
import math

import pytest
import torch

from minigpt.speed import logits as reading
from minigpt.speed import native
from tests.minigpt.speed.test_native import ISAS

VOCAB = 50257  # GPT-2's: not a multiple of the 64-value blocks


@pytest.fixture(params=ISAS)
def in_c(request, monkeypatch):
    """The module reads rows with this variant's library."""
    lib = native.library(request.param)
    monkeypatch.setattr(reading, "_library", lambda: lib)
    return lib


@pytest.fixture
def in_pytorch(monkeypatch):
    monkeypatch.setattr(reading, "_library", lambda: None)


def rows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(VOCAB, generator=g) * 4
    rising = torch.linspace(-20, 20, VOCAB)  # every block beats the last: the list is rebuilt all the way
    masked = torch.randn(VOCAB, generator=g).masked_fill(torch.rand(VOCAB, generator=g) < 0.999, float("-inf"))
    return [spread, rising, masked, torch.randn(7, generator=g)]


@pytest.mark.parametrize("top_n", [0, 1, 5, 20])
def test_log_probs_are_log_softmax_and_topk(in_c, top_n):
    """Against log_softmax in float64: the C sum is in double, closer than PyTorch's float32 sum (off by up to
    6e-6 on these rows)."""
    for row in rows():
        expected = row.double().log_softmax(dim=-1)
        top = torch.topk(expected, min(top_n, row.numel()))
        for token in (0, int(row.argmax()), row.numel() - 1):
            chosen, alternatives = reading.log_probs(row, token, top_n)
            assert chosen == pytest.approx(float(expected[token]), rel=1e-6, abs=1e-6)
            assert [i for i, _ in alternatives] == top.indices.tolist()
            assert [v for _, v in alternatives] == pytest.approx(top.values.tolist(), rel=1e-6, abs=1e-6)


def test_equal_values_come_in_index_order_as_argmax_takes_them(in_c):
    row = torch.zeros(VOCAB)
    row[[3000, 70, 50000, 9000]] = torch.tensor([2.0, 2.0, 1.0, 2.0])
    assert int(reading.first_max(row)) == int(row.argmax()) == 70
    _, alternatives = reading.log_probs(row, 0, 5)
    assert [i for i, _ in alternatives] == [70, 3000, 9000, 50000, 0]  # then the zeros, from the first


def test_the_first_max_is_argmax(in_c):
    for row in rows():
        assert reading.first_max(row).tolist() == [int(row.argmax())]



def kept_by_top_k(row: torch.Tensor, k: int) -> list[int]:
    """What the sampler's top-k stage keeps of a row (sampling.warper_stages): all not below the k-th largest."""
    return (row >= torch.topk(row, k).values[-1]).nonzero().flatten().tolist()


@pytest.mark.parametrize("k", [1, 3, 40])
def test_top_k_ids_are_what_the_top_k_stage_keeps(in_c, k):
    """The rows above, and a row whose k-th largest value ties with others below it: all of them are kept."""
    tied = torch.randn(VOCAB)
    tied[[5, 60, 7000, 50256]] = 100.0
    tied[[9, 33000, 40000]] = 50.0  # the largest after the four above: k = 1 or 3 cuts inside one tie
    for row in [*rows(), tied]:
        if k < row.numel():
            assert reading.top_k_ids(row, k).tolist() == kept_by_top_k(row, k)


def test_top_k_ids_without_the_library(in_pytorch):
    row = rows()[0]
    assert reading.top_k_ids(row, 40).tolist() == kept_by_top_k(row, 40)

def test_nan_is_never_taken(in_c):
    row = torch.randn(VOCAB)
    row[[0, 100, 4000]] = float("nan")
    finite = row.nan_to_num(nan=float("-inf"))
    assert int(reading.first_max(row)) == int(finite.argmax())
    chosen, alternatives = reading.log_probs(row, 5, 3)
    assert math.isnan(chosen)  # the sum of exponentials is NaN, as log_softmax's is
    assert [i for i, _ in alternatives] == torch.topk(finite, 3).indices.tolist()


def test_other_logits_take_pytorch(in_c):
    """Several rows, a strided row, another dtype: PyTorch's answers."""
    batch = torch.randn(3, VOCAB)
    assert torch.equal(reading.first_max(batch), batch.argmax(dim=-1, keepdim=True))
    strided = batch[:, 0]
    assert torch.equal(reading.first_max(strided), strided.max(dim=-1, keepdim=True).indices)
    half = batch[0].bfloat16()
    chosen, alternatives = reading.log_probs(half, 2, 2)
    expected = half.log_softmax(dim=-1)
    top = torch.topk(expected, 2)
    assert (chosen, alternatives) == (float(expected[2]), list(zip(top.indices.tolist(), top.values.tolist())))


def test_without_the_library_pytorch_reads_the_row(in_pytorch):
    row = rows()[0]
    expected = row.log_softmax(dim=-1)
    top = torch.topk(expected, 5)
    assert reading.log_probs(row, 9, 5) == (float(expected[9]), list(zip(top.indices.tolist(), top.values.tolist())))
    assert torch.equal(reading.first_max(row), row.max(dim=-1, keepdim=True).indices)


@pytest.mark.parametrize("token", [-1, VOCAB])
def test_a_token_outside_the_row_is_refused(in_c, token):
    with pytest.raises(IndexError, match=f"token {token} is outside the {VOCAB} logits"):
        reading.log_probs(torch.randn(VOCAB), token, 5)
