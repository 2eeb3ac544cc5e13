"""The registered model: what `mlflow models serve` and `predict --model models:/...` run.

The network and its refusal statistics (mnist_cnn.refusal) in one MLflow python model. Input:
normalised images (N, 1, 28, 28) float32, as before. Output: one row per image, `digit` (-1 when
refused), `probability` (temperature-calibrated; 0 when refused) and `reason` (null, or why the
image was refused), which `mlflow models serve` answers as {"predictions": [{...}, ...]}.
One forward pass per request: the refusal reads the same pass's penultimate features.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch

from mnist_cnn import refusal
from mnist_cnn.model import load_model


class ServedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.net = load_model(context.artifacts["checkpoint"])
        self.stats = torch.load(context.artifacts["refusal"], map_location="cpu", weights_only=True)

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params: dict | None = None
    ) -> pd.DataFrame:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        digits, probabilities, reasons = refusal.answer(self.net, self.stats, x)
        return pd.DataFrame({"digit": digits, "probability": probabilities, "reason": reasons})
