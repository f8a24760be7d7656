"""Fixtures for the tests of backgrounder_testing (pytester comes from addopts)."""

from __future__ import annotations

import pytest

from backgrounder_testing import SimulatedGPUs


@pytest.fixture
def simulated_gpus() -> type[SimulatedGPUs]:
    """The SimulatedGPUs class, as task authors import it."""
    return SimulatedGPUs
