import json

import pytest

from tests.helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model with larger-than-GPT-2 initial weights (so a frozen random lm_head can still express
    confident predictions), and the hand-written instruction set as a .json file."""
    from tests.lora.test_train import RECORDS
    folder = tmp_path_factory.mktemp("train")
    make_checkpoint(folder / "model", initializer_range=0.2)
    (folder / "data.json").write_text(json.dumps(RECORDS))
    return folder
