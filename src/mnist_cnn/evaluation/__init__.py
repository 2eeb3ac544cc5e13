"""Evaluation sets: MNIST-C corruptions and robustness curves, other writers' digits, generated non-digits."""
