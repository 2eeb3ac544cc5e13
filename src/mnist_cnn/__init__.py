"""Reproducible MNIST CNN pipeline: DVC stages, PyTorch training, MLflow tracking."""
