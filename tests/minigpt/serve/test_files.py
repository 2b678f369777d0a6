"""Bounded storage for clients: the upload budget (per client, in total, over a window) and the export folder."""
import subprocess
import sys
from pathlib import Path

from minigpt.serve.files import ExportFolder, UploadBudget
from tests.helpers import REPO

MiB = 2**20


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_uploads_are_bounded_per_client_and_in_total_until_they_age_out():
    clock = Clock()
    budget = UploadBudget(per_client=4 * MiB, total=6 * MiB, window_s=100, clock=clock)
    assert [budget.refusal("a", MiB) for _ in range(4)] == [None] * 4
    assert "Too many uploads from you: at most 4 MiB per" in budget.refusal("a", 1)  # a's own budget
    assert budget.refusal("b", 2 * MiB) is None  # another client still may, up to the total
    assert "its upload space is full" in budget.refusal("c", 1)
    clock.now += 99
    assert budget.refusal("c", 1) is not None  # nothing has aged out yet
    clock.now += 1
    assert budget.refusal("a", 4 * MiB) is None  # the window has passed: all of it is free again


def test_exports_keep_each_sessions_latest_and_at_most_the_limit(tmp_path):
    exports = ExportFolder(limit=3)
    first = exports.write("one")
    second = exports.write("two", replacing=first)
    assert not first.exists() and second.read_text() == "two"  # a session's new export replaces its last
    others = [exports.write(f"other {i}") for i in range(4)]
    kept = sorted(exports.path.glob("*.json"))
    assert len(kept) == 3 and set(kept) == set(others[-3:])  # the oldest went first
    outside = tmp_path / "mine.json"
    outside.write_text("not an export")
    exports.write("x", replacing=outside)
    assert outside.exists()  # only files of its own folder are ever deleted


def test_the_export_folder_is_removed_when_the_server_exits():
    run = subprocess.run([sys.executable, "-c", "from minigpt.serve.files import ExportFolder\n"
                          "e = ExportFolder(); e.write('{}'); print(e.path)"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    folder = Path(run.stdout.strip())
    assert run.returncode == 0 and folder.name.startswith("minigpt-exports-") and not folder.exists()
