"""The model registry: the champion gate (a pure fold over versions) and the writes that publish a version."""
