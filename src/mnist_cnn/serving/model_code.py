"""The served model as MLflow's models-from-code logs it: MLflow runs this file, not a pickle, to build it."""

from mlflow.models import set_model

from mnist_cnn.serving.served import ServedModel

set_model(ServedModel())
