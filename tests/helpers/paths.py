"""Where things are: the repository root, the test fixtures, the hog program."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
HOG = str(TESTS / "hog.py")
