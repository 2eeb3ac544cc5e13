"""`make serve`: MLflow's scoring app for one registered model, behind the guard (serving.guard), on uvicorn.

The model URI (models:/mnist-cnn@champion by default) is resolved ONCE, at start: the version it names
then is downloaded and printed, and every worker serves that copy; a champion that moves later is
picked up by a restart. As `mlflow models serve --env-manager local` does, each of the `--workers`
uvicorn processes loads the model from the downloaded folder, with the code the version was
registered with; unlike it, the app each one runs is MLflow's wrapped in the guard.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

MODEL_PATH_ENV = "MNIST_CNN_SERVE_MODEL_PATH"  # the downloaded model, for the workers
MAX_BODY_ENV = "MNIST_CNN_SERVE_MAX_BODY"
BATCH_WAIT_ENV = "MNIST_CNN_SERVE_BATCH_WAIT_MS"
BATCH_ROWS_ENV = "MNIST_CNN_SERVE_BATCH_ROWS"
DEFAULT_MODEL = "models:/mnist-cnn@champion"


def takes_pixels(model: object) -> bool:
    """Whether the model's input is uint8 pixels (N, 28, 28), the requests the guard checks and batches."""
    import numpy as np

    schema = model.metadata.get_input_schema()  # type: ignore[attr-defined]
    inputs = schema.inputs if schema is not None and schema.is_tensor_spec() else []
    return len(inputs) == 1 and inputs[0].type == np.dtype(np.uint8) and tuple(inputs[0].shape) == (-1, 28, 28)


def create_app() -> object:
    """uvicorn's app factory, run in each worker: the model loaded from MODEL_PATH_ENV, MLflow's app
    for it (mlflow.pyfunc.scoring_server.init, as `mlflow models serve` builds it), the guard around."""
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server

    from mnist_cnn.serving.batching import MAX_ROWS
    from mnist_cnn.serving.guard import MAX_BODY, Guard

    # The model imports `mnist_cnn` from the code it was registered with (its code path comes first
    # on sys.path), as under `mlflow models serve`: this process's copy is forgotten before it loads
    # (the guard keeps the modules it already holds).
    for name in [name for name in sys.modules if name == "mnist_cnn" or name.startswith("mnist_cnn.")]:
        del sys.modules[name]
    model = scoring_server.load_model_with_mlflow_config(os.environ[MODEL_PATH_ENV])
    app = scoring_server.init(model)
    return Guard(
        app,
        model.predict if takes_pixels(model) else None,
        max_body=int(os.environ.get(MAX_BODY_ENV, MAX_BODY)),
        timeout_s=float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()),
        wait_s=float(os.environ.get(BATCH_WAIT_ENV, "0")) / 1000,
        max_rows=int(os.environ.get(BATCH_ROWS_ENV, MAX_ROWS)),
    )


def resolve(uri: str, destination: str) -> tuple[str, str]:
    """(what `uri` names now, as a line to print; the local folder it was downloaded to)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    from mnist_cnn.cli import UserError

    described = uri
    try:
        if uri.startswith("models:/") and "@" in uri:
            name, alias = uri.removeprefix("models:/").split("@", 1)
            version = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
            described = f"{uri} = version {version.version} of {name} (run {version.run_id})"
        path = _download_artifact_from_uri(uri, output_path=destination)
    except MlflowException as error:
        raise UserError(f"{uri}: {error.message.splitlines()[0][:200]}") from None
    return described, path


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from mnist_cnn.cli import UserError
    from mnist_cnn.serving.batching import MAX_ROWS
    from mnist_cnn.serving.guard import MAX_BODY

    parser = argparse.ArgumentParser(
        prog="python -m mnist_cnn.serving.server", description=__doc__.splitlines()[0], add_help=False
    )
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model URI or folder ({DEFAULT_MODEL})")
    parser.add_argument("--host", "-h", default="127.0.0.1")
    parser.add_argument("--port", "-p", type=int, default=5001)
    parser.add_argument("--workers", "-w", type=int, default=1, help="uvicorn processes (one per core)")
    parser.add_argument("--max-body", type=int, default=MAX_BODY, help=f"bytes per request body ({MAX_BODY})")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0, help="gather a batch this long (default 0)")
    parser.add_argument("--batch-rows", type=int, default=MAX_ROWS, help=f"pictures per forward pass ({MAX_ROWS})")
    args = parser.parse_args(argv)
    if args.max_body < 1 or args.batch_rows < 1 or not 0 <= args.batch_wait_ms <= 100:
        raise UserError("--max-body and --batch-rows must be >= 1, --batch-wait-ms 0..100")

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar line per file otherwise
    with tempfile.TemporaryDirectory(prefix="mnist-cnn-serve-") as folder:
        if os.path.isdir(args.model):
            described, path = f"the model folder {args.model}", args.model
        else:
            described, path = resolve(args.model, folder)
        print(f"serving {described}", flush=True)
        # The workers are new processes (spawned): they read their settings from the environment.
        os.environ.update({MODEL_PATH_ENV: path, MAX_BODY_ENV: str(args.max_body),
                           BATCH_WAIT_ENV: str(args.batch_wait_ms), BATCH_ROWS_ENV: str(args.batch_rows)})  # fmt: skip
        access_log = os.environ.get("UVICORN_ACCESS_LOG", "false") == "true"
        uvicorn.run("mnist_cnn.serving.server:create_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers, access_log=access_log)  # fmt: skip


if __name__ == "__main__":
    from mnist_cnn.cli import run_stage

    run_stage(main)
