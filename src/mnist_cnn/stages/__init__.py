"""The DVC stages, one module each (dvc.yaml runs `python -m mnist_cnn.stages.<name>`); none imports another."""
