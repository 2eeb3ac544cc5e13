"""The scoring server's floor: a python model (MLflow's models from code) that does no work, one
constant record per picture, with the served model's signature. Served like the champion, it
measures the server alone (docs/serving.md); `python -m mnist_cnn.tools.floor DIR` saves it."""

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

RECORD = {"digit": 0, "probability": 1.0, "reason": None}


class Floor(PythonModel):
    # No type hints: MLflow would infer a signature from them instead of taking the served model's.
    def predict(self, context, model_input, params=None):
        return [RECORD] * len(model_input)


set_model(Floor())
