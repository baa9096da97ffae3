"""Loading the hand-written ``kubectl get -o json`` fixtures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_items(name: str) -> list[dict[str, Any]]:
    """Items of a List stored under fixtures/ (a fresh copy on every call)."""
    items: list[dict[str, Any]] = json.loads((FIXTURES / name).read_text())["items"]
    return items
