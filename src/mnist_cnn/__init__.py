"""Reproducible MNIST CNN pipeline: DVC stages, PyTorch training, MLflow tracking and registry.

Layers, each importing only those above it (docs/development.md draws them):
cli, config, paths, files -> data -> core -> tracking | evaluation -> serving -> registry -> stages | tools.
"""
