"""python -m minigpt.space: the folder a Space runs, its front matter and requirements read as the Hub and
pip read them, and the push through huggingface_hub against a local server speaking the Hub's upload
protocol. Running the folder as a Space runs it: tests/app/test_deploy.py."""
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from huggingface_hub import SpaceCard
from packaging.requirements import Requirement

from minigpt import space
from minigpt.adapters import CONFIG_FILE, WEIGHTS_FILE
from minigpt.space import CPU_INDEX, MAX_SHORT_DESCRIPTION, TRAINING_ONLY, build
from tests.helpers import REPO, call_main
from tests.helpers.app_server import free_port, make_adapter
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.hub_server import FakeHub


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("space")
    return make_adapter(make_checkpoint(tmp / "model")[0], tmp / "adapter")


def space_command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minigpt.space", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def tracked(folder: str) -> set[str]:
    """The checkout's files under folder, as git knows them (the oracle for what the package is)."""
    listing = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True, check=True)
    return set(listing.stdout.split())


def test_the_folder_holds_exactly_the_app_the_package_and_the_adapter(tmp_path, adapter):
    files = build(tmp_path / "space", str(adapter))
    on_disk = {str(p.relative_to(tmp_path / "space")) for p in (tmp_path / "space").rglob("*") if p.is_file()}
    package = {f for f in tracked("minigpt") if not f.endswith((".md", ".txt"))}
    adapter_files = {f"checkpoints/alpaca-lora/{CONFIG_FILE}", f"checkpoints/alpaca-lora/{WEIGHTS_FILE}"}
    assert set(files) == on_disk == {"app.py", "README.md", "requirements.txt", "packages.txt",
                                     "assets/screenshot.png", *adapter_files, *package}
    for name in ["app.py", "assets/screenshot.png", "minigpt/speed/decode_step.c", "minigpt/serve/app.css",
                 "minigpt/serve/inspect.js"]:
        assert (tmp_path / "space" / name).read_bytes() == (REPO / name).read_bytes()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (tmp_path / "space/checkpoints/alpaca-lora" / name).read_bytes() == (adapter / name).read_bytes()
    assert (tmp_path / "space/packages.txt").read_text().split() == ["build-essential"]  # cc, no comments


def test_the_front_matter_is_a_space_card_within_the_hubs_limits(tmp_path):
    build(tmp_path, None)
    card = SpaceCard.load(tmp_path / "README.md")
    assert card.data.sdk == "gradio" and card.data.sdk_version == version("gradio")
    assert (tmp_path / card.data.app_file).is_file()
    assert card.data.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"  # the version tested
    assert 0 < len(card.data.short_description) <= MAX_SHORT_DESCRIPTION
    assert card.text.lstrip().startswith("# MiniGPT") and "MINIGPT_API_KEY" in card.text


def test_requirements_install_the_cpu_torch_on_a_space_but_locally_need_no_other_index(tmp_path):
    build(tmp_path, None)
    lines = [line for line in (tmp_path / "requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == f"--extra-index-url {CPU_INDEX}"
    space = {r.name: r for r in map(Requirement, lines[1:])}
    local = [Requirement(line) for line in (REPO / "requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert str(space["torch"].specifier) == f"{local[0].specifier}+cpu" and local[0].name == "torch"
    assert {r.name: str(r.specifier) for r in local[1:] if r.name not in TRAINING_ONLY} == \
        {n: str(r.specifier) for n, r in space.items() if n != "torch"}
    assert all(name in {r.name for r in local} for name in TRAINING_ONLY)
    assert not any(line.startswith("-") for line in (REPO / "requirements.txt").read_text().splitlines())
    # pip reads the file as a Space's build does (offline: what it asks for is what this machine has)
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "-r",
                          "requirements.txt"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_push_creates_the_space_and_uploads_the_folder_as_built(tmp_path, adapter):
    with FakeHub() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
        run = space_command("--out", str(tmp_path / "space"), "--adapter", str(adapter), "--push", "me/chat", env=env)
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[-1] == f"pushed: {hub.url}/spaces/me/chat"
        pushed = hub.repos[("space", "me/chat")]
        folder = tmp_path / "space"
        assert pushed == {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        assert hub.readmes[-1] == (folder / "README.md").read_text()  # checked by the Hub before the commit
        again = space_command("--no-adapter", "--push", "me/chat", env=env)  # an existing Space: a new commit
        assert again.returncode == 0, again.stderr
        assert hub.requests.count("POST /api/spaces/me/chat/commit/main") == 2


@pytest.mark.parametrize("case", ["out not empty", "broken adapter", "nothing asked", "hub unreachable"])
def test_refusals_are_one_error_line(tmp_path, case):
    args = ["--out", str(tmp_path / "space"), "--no-adapter"]
    env = {}
    if case == "out not empty":
        (tmp_path / "space").mkdir()
        (tmp_path / "space" / "keep.txt").write_text("mine")
    elif case == "broken adapter":
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / CONFIG_FILE).write_text("{not json")
        (tmp_path / "adapter" / WEIGHTS_FILE).write_bytes(b"")
        args = ["--out", str(tmp_path / "space"), "--adapter", str(tmp_path / "adapter")]
    elif case == "nothing asked":
        args = []
    else:
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"}
        args = ["--no-adapter", "--push", "me/chat"]
    # The Hub's address is read when huggingface_hub is imported: that case needs a new Python
    run = space_command(*args, env=env) if env else call_main(space.main, *args)
    assert run.returncode == 2, run.stderr
    if case != "nothing asked":  # argparse's usage error: the usage, then its error line
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), run.stderr
    assert {"out not empty": "is not an empty folder", "broken adapter": "is not valid JSON",
            "nothing asked": "give --out DIR, --push USER/NAME, or both",
            "hub unreachable": "cannot push to the Space me/chat: the Hub cannot be reached"}[case] in run.stderr
    if case == "out not empty":
        assert [p.name for p in (tmp_path / "space").iterdir()] == ["keep.txt"]  # nothing lost
