"""Kubernetes tests: hand-written cluster objects and the API-server double."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from k8s_objects import load_items  # noqa: E402


@pytest.fixture
def services() -> dict[str, dict[str, Any]]:
    return {
        f"{s['metadata']['namespace']}/{s['metadata']['name']}": s
        for s in load_items("services.json")
    }


@pytest.fixture
def slices() -> dict[str, dict[str, Any]]:
    return {s["metadata"]["name"]: s for s in load_items("endpointslices.json")}
