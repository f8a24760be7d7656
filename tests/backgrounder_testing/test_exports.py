"""backgrounder_testing's public names are all exported and importable."""

from __future__ import annotations

import backgrounder_testing


def test_exports_all_names_resolve(simulated_gpus: type) -> None:
    """Every name in __all__ resolves, SimulatedGPUs included (imported lazily)."""
    for name in backgrounder_testing.__all__:
        assert getattr(backgrounder_testing, name) is not None, name
    assert backgrounder_testing.SimulatedGPUs is simulated_gpus


def test_exports_cover_public_names() -> None:
    """No public name of the package is left out of __all__."""
    public = {
        name
        for name, value in vars(backgrounder_testing).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("backgrounder_testing")
    }
    assert public <= set(backgrounder_testing.__all__)
