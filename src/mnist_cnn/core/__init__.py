"""The model and its training: the network, augmentation, the training step and loop, data parallelism."""
