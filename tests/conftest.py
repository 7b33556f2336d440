"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cri import CriClient
from tests.daemon import Daemon, running_daemon

pytest_plugins = ["tests.support.plugin"]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A fresh `flatpod serve` of this test's own."""
    with running_daemon(tmp_path) as d:
        yield d


@pytest.fixture
def cri(daemon: Daemon) -> Iterator[CriClient]:
    client = daemon.client()
    yield client
    client.close()
