"""The out-of-distribution handwriting set (src/mnist_cnn/evaluation/ood.py): built deterministically, through
predict's real preprocessing, with sklearn's labels, and readable by a model trained on MNIST."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.datasets import load_digits

from mnist_cnn.core.picture import to_mnist
from mnist_cnn.evaluation import ood

EVERY = 97  # the rows recomputed from their pictures: a spread over writers and digits


def test_pictures_are_deterministic_and_varied() -> None:
    first = list(itertools.islice(ood.pictures(), 40))
    second = list(itertools.islice(ood.pictures(), 40))
    assert [(p.tobytes(), p.size, label) for p, label in first] == [(p.tobytes(), p.size, label) for p, label in second]
    # What a user sends varies: sizes, and both light and dark pages.
    assert len({p.size for p, _ in first}) > 30
    pages = [float(np.median(np.asarray(p)[0])) for p, _ in first]
    assert min(pages) < 128 < max(pages)


def test_set_is_predicts_preprocessing_of_the_pictures() -> None:
    images, labels = ood.load_ood_set()
    assert images.dtype == np.uint8 and images.shape == (1797, 28, 28)
    assert labels.dtype == np.int64 and np.array_equal(labels, load_digits().target)
    for index, (picture, label) in enumerate(ood.pictures()):
        if index % EVERY == 0:
            assert label == labels[index]
            assert np.array_equal(to_mnist(picture), images[index]), index
    again, _ = ood.load_ood_set()
    assert again is images and not images.flags.writeable  # cached once per process, kept intact


def test_set_is_mnist_shaped_but_not_trivial() -> None:
    images, labels = ood.load_ood_set()
    # MNIST's framing (light ink on black reaching full strength, centred by mass, a nearly empty border) ...
    assert (images.reshape(len(images), -1).max(1) == 255).all()
    assert np.allclose(ndimage.center_of_mass(images.astype(np.float64).mean(0)), 13.5, atol=1.0)
    assert images[:, 0].mean() < 1 and images[:, :, 0].mean() < 1
    # ... but real, different digits: no two alike, every class present about equally.
    assert len({image.tobytes() for image in images}) == len(images)
    assert np.bincount(labels, minlength=10).min() > 150
    # Per class, the mean picture differs from every other class's (the labels carry the shapes).
    means = np.stack([images[labels == d].mean(0) for d in range(10)]).reshape(10, -1)
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(10, dtype=bool)].min() > 10


def test_a_model_trained_on_mnist_reads_it_well_above_chance(mnist_net: torch.nn.Module) -> None:
    accuracy = ood.ood_accuracy(mnist_net)
    assert 0.5 < accuracy <= 1.0  # chance is 0.1
    # The function scores what it is given: a model that always answers 3 gets 3's share.
    always_three = ood.ood_accuracy(lambda x: torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float())
    assert always_three == pytest.approx(float(np.mean(ood.load_ood_set()[1] == 3)))
