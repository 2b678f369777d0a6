"""`python -m tests.helpers.crash_training N ARGS...`: lora.train ARGS, hard-killed (os._exit, no cleanup)
at its N-th held-out evaluation, in every process of a torchrun job: a deterministic stand-in for
`kill -9` at a known step."""
import os
import sys

import minigpt.training
from lora.train import main

crash_at = int(sys.argv[1])
real_evaluate = minigpt.training.evaluate
calls = 0


def evaluate_then_crash(*args):
    global calls
    calls += 1
    if calls == crash_at:
        os._exit(9)
    return real_evaluate(*args)


minigpt.training.evaluate = evaluate_then_crash
sys.exit(main(sys.argv[2:]))
