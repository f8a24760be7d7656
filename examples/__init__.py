"""Real tasks used by the demo and the README."""
