"""The registered model: the network and its refusal statistics in one MLflow python model, what
`mlflow models serve` and `predict --model models:/...` run.

Input: uint8 MNIST pixels (N, 28, 28), light ink on black (predict's preprocessing of a picture). Output:
one record per image, {"digit": 0-9 or -1 when refused, "probability": calibrated (0 when refused),
"reason": None or why it was refused}: plain records, which the scoring server writes as they are.
"""

from __future__ import annotations

import gc

import mlflow
import numpy as np
import torch

from mnist_cnn.core import refusal
from mnist_cnn.core.model import Net, load_model, normalize_fields

Record = dict[str, int | float | str | None]


def answers(net: Net, stats: dict[str, torch.Tensor], pixels: np.ndarray) -> list[Record]:
    """The served records for uint8 pixels (N, 28, 28)."""
    digits, probabilities, reasons = refusal.answer(net, stats, normalize_fields(pixels))
    return [
        {"digit": d, "probability": p, "reason": r}
        for d, p, r in zip(digits.tolist(), probabilities.tolist(), reasons, strict=True)
    ]


class ServedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.net = load_model(context.artifacts["checkpoint"])
        self.stats = torch.load(context.artifacts["refusal"], map_location="cpu", weights_only=True)
        # Everything loaded so far (MLflow, FastAPI, torch, pandas: long-lived, never garbage) is moved out
        # of the garbage collector's reach: a full collection walks it all and stalls every request in
        # flight (docs/serving.md). The requests' own objects are still collected.
        gc.collect()
        gc.freeze()

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params: dict | None = None
    ) -> list[Record]:
        return answers(self.net, self.stats, model_input)
