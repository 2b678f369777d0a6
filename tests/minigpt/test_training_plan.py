"""The training plan's arithmetic (costs, budget fit, evaluation cap), the LR schedule's segments and the
example-keyed dropout, without running a model."""
import math

import pytest
import torch

from minigpt.dropout import ExampleDropout, example_keys
from minigpt.plan import EVAL_SHARE, RunCosts, fit_steps
from minigpt.schedule import Schedule, Segment

COSTS = RunCosts(step_s=2.0, eval_example_s=0.1, save_s=1.5, plot_s=0.5)


def test_the_plan_counts_evaluations_checkpoints_and_the_plot():
    # steps 1..250, evaluation at 100, 200 and the end (250), checkpoints at 100, 200, 250
    parts = COSTS.seconds(0, 250, eval_every=100, save_every=100, eval_examples=40)
    assert (parts.n_evals, parts.n_saves) == (3, 3)
    assert parts.training == 500 and parts.evaluation == pytest.approx(3 * 40 * 0.1)
    assert parts.total == pytest.approx(500 + 12 + 4.5 + 0.5)
    resumed = COSTS.seconds(200, 300, eval_every=100, save_every=50, eval_examples=40)
    assert (resumed.n_evals, resumed.n_saves) == (1, 2)  # at 300; checkpoints at 250, 300


def test_the_default_evaluation_stays_within_its_share_of_training():
    for start, end, every, available in [(0, 1000, 100, 10_000), (0, 13, 100, 2588), (40, 90, 10, 500)]:
        n = COSTS.default_eval_examples(start, end, every, available, floor=8)
        parts = COSTS.seconds(start, end, every, 100, n)
        assert 8 <= n <= available and parts.evaluation <= EVAL_SHARE * parts.training + 1e-9
        assert COSTS.seconds(start, end, every, 100, n + 1).evaluation > EVAL_SHARE * parts.training  # the most
    assert COSTS.default_eval_examples(0, 1000, 100, available=30, floor=8) == 30  # all there is
    assert COSTS.default_eval_examples(0, 2, 100, available=500, floor=8) == 8  # one micro-batch at least


def test_fit_steps_finds_the_most_that_fit():
    def seconds(n):
        return COSTS.seconds(0, n, 100, 100, 40).total
    n = fit_steps(seconds, 600.0, 10_000)
    assert seconds(n) <= 600 < seconds(n + 1)
    assert fit_steps(seconds, 1e9, 123) == 123 and fit_steps(seconds, 0.0, 50) == 1


def test_a_new_run_warms_up_then_decays_to_zero():
    schedule = Schedule.new(100, None)
    assert schedule.segments == (Segment(0, 100, 5),)
    assert [schedule.factor(s) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert schedule.factor(99) > 0 and schedule.factor(100) == pytest.approx(0)
    assert schedule.describe(0, 3e-4) == "lr warm-up over 5 steps to 0.0003, then cosine to 0 at step 100"


def test_extending_an_unfinished_run_continues_the_cosine_without_a_jump():
    schedule = Schedule.new(100, 0)
    longer = schedule.extended(60, 200, None)
    assert longer.factor(60) == pytest.approx(schedule.factor(60))  # no jump where the new segment starts
    assert [longer.factor(s) for s in range(60)] == [schedule.factor(s) for s in range(60)]  # the past unchanged
    assert longer.factor(130) == pytest.approx(schedule.factor(60) * 0.5) and longer.factor(200) == pytest.approx(0)
    assert longer.describe(60, 1.0) == f"lr continues its cosine from {schedule.factor(60):.3g} to 0 at step 200"


def test_extending_a_finished_run_warms_up_again():
    schedule = Schedule.new(20, 2).extended(20, 60, None)
    assert schedule.segments[-1] == Segment(20, 60, 2)
    assert schedule.factor(19) < 0.01 and schedule.factor(20) == 0.5 and schedule.factor(21) == 1.0
    assert schedule.factor(60) == pytest.approx(0)
    assert "again (a new segment after the finished run), then cosine to 0 at step 60" in schedule.describe(20, 1e-3)
    assert Schedule.from_json(schedule.to_json()) == schedule  # what the checkpoint stores


def test_dropout_masks_follow_the_example_not_the_batch_or_padding():
    layer = ExampleDropout(0.5, layer=3).train()
    x = torch.ones(3, 7, 16)
    layer.keys = example_keys(0, 5, [0, 1, 2])
    whole = layer(x)
    layer.keys = example_keys(0, 5, [2])
    alone = layer(x[:1, :4])  # row 2 on its own, in a narrower (less padded) batch
    torch.testing.assert_close(alone[0], whole[2, :4], rtol=0, atol=0)
    assert not torch.equal(whole[0], whole[1])  # different examples, different masks
    kept = (whole != 0).float().mean().item()
    assert abs(kept - 0.5) < 0.1 and set(whole.unique().tolist()) <= {0.0, 2.0}
    other_layer = ExampleDropout(0.5, layer=4).train()
    other_layer.keys = example_keys(0, 5, [0, 1, 2])
    assert not torch.equal(other_layer(x), whole)
    layer.keys = example_keys(0, 6, [0, 1, 2])
    assert not torch.equal(layer(x), whole)  # another step, other masks
    assert torch.equal(layer.eval()(x), x)


def test_dropout_without_keys_is_ordinary_dropout():
    layer = ExampleDropout(0.25).train()
    torch.manual_seed(0)
    ours = layer(torch.ones(4, 8))
    torch.manual_seed(0)
    theirs = torch.nn.Dropout(0.25).train()(torch.ones(4, 8))
    assert torch.equal(ours, theirs) and not math.isnan(ours.sum().item())
