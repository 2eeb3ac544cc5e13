"""Which picture effects move ood_accuracy: one model, the OOD set with its strokes made finer or
bolder and blurred, and the stroke thickness of MNIST against the OOD set.

    PYTHONPATH=src python dev/ood-sweep/effects.py MODEL.pt [MODEL.pt ...]   # from a dir with data/processed
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from scipy import ndimage

from mnist_cnn.core.model import load_checkpoint, normalize
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.evaluation.ood import load_ood_set

CROSS = ndimage.generate_binary_structure(2, 1)[None]  # 4-neighbourhood, per picture
EFFECTS = {
    "as built": lambda x: x,
    "finer (3x3 grey erosion)": lambda x: ndimage.grey_erosion(x, size=(1, 3, 3)),
    "finer (cross erosion)": lambda x: ndimage.grey_erosion(x, footprint=CROSS),
    "bolder (cross dilation)": lambda x: ndimage.grey_dilation(x, footprint=CROSS),
    "blur sigma 0.7": lambda x: ndimage.gaussian_filter(x.astype(np.float32), sigma=(0, 0.7, 0.7)),
    "sharpened (x1.6 contrast)": lambda x: np.clip(x.astype(np.float32) * 1.6, 0, 255),
}


def stroke_width(images: np.ndarray) -> float:
    """Median over pictures of twice the 95th-percentile distance of ink (> 127) to the background."""
    widths = []
    for image in images:
        mask = image > 127
        widths.append(2 * np.percentile(ndimage.distance_transform_edt(mask)[mask], 95))
    return float(np.median(widths))


def main() -> None:
    images, labels = load_ood_set()
    test_x, _ = load_processed("test")
    mnist = test_x[:2000, 0].numpy()
    widths = {"stroke_width_mnist_test": stroke_width(mnist), "stroke_width_ood": stroke_width(images)}
    ink = {"ink_fraction_mnist": float((mnist > 127).mean()), "ink_fraction_ood": float((images > 127).mean())}
    print(json.dumps(widths | ink))
    for path in sys.argv[1:]:
        net = load_checkpoint(path).eval()
        row = {"model": path}
        for name, effect in EFFECTS.items():
            x = torch.from_numpy(np.clip(np.rint(effect(images)), 0, 255).astype(np.uint8)).unsqueeze(1)
            with torch.no_grad():
                row[name] = float((net(normalize(x)).argmax(1).numpy() == labels).mean())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
