"""Test helpers shared by the tests and bench/: tiny Hub-layout checkpoints, a running app."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root
