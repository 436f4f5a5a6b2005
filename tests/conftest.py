"""Fixtures for every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_emailproxy_logger() -> Iterator[None]:
    """Code under test may call setup_logging(), which reconfigures the global "emailproxy" logger
    (handlers, level, propagation). Put it back after each test so later tests see a normal logger."""
    logger = logging.getLogger("emailproxy")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
