"""Stage register: the only stage that writes to the model registry, and the last.

models/model.pt + models/refusal.pt + metrics/{eval,robustness}.json -> the served model (serving.served:
exactly these weights and refusal statistics) logged to the execution's run and registered as a version of
`mnist-cnn`, tagged with its headline accuracies; `challenger` on it when it is eligible and `champion` where
registry.gate (margins from params register.*) puts it; models/registered.json naming them. First the run
gets the metrics of this execution's DVC metrics files it lacks (those of stages DVC did not rerun), so the
gate reads a version's every metric from its run.
"""

from __future__ import annotations

import mlflow

from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.config import load_params
from mnist_cnn.core.model import load_checkpoint
from mnist_cnn.data.mnist import load_processed
from mnist_cnn.files import load_tensors, read_json, write_json
from mnist_cnn.paths import DVC_LOCK, EVAL_METRICS, MODEL_PATH, REFUSAL_STATS, REGISTERED, ROBUST_METRICS
from mnist_cnn.registry import publish
from mnist_cnn.tracking import lineage, store


def main() -> None:
    params = load_params()
    metrics = {k: float(v) for p in (EVAL_METRICS, ROBUST_METRICS) for k, v in read_json(p, "dvc repro").items()}
    for path in (MODEL_PATH, REFUSAL_STATS):
        if not path.is_file():
            raise UserError(f"{path}: missing or unreadable (run dvc repro first)")
    digest = publish.artifacts_digest(MODEL_PATH, REFUSAL_STATS)
    images, labels = load_processed("test")

    with store.execution_run(params) as run:
        client = mlflow.MlflowClient()
        existing = publish.find_version(client, run.info.run_id, digest)
        if existing is None:
            example = images[:4, 0].numpy()  # uint8 pixels (4, 28, 28): what the served model takes
            net, stats = load_checkpoint(str(MODEL_PATH)), load_tensors(REFUSAL_STATS)
            version, model_id = publish.log_and_register(net, stats, example, digest)
        else:
            version, model_id = str(existing.version), publish.logged_model_id(existing)
        # The test accuracy on the run and on the logged model, linked to the test set (MLflow 3's metric
        # lineage): the logged model's page shows what it scored, and on which data.
        test_set = lineage.dataset(params, "test", images.numpy(), labels.numpy())
        store.log_new({"test_accuracy": metrics["test_accuracy"]}, dataset=test_set, model_id=model_id)
        store.log_new(store.run_metrics(metrics))  # those of stages this execution did not run
        if DVC_LOCK.exists():  # the hashes of the data, code and params this model was made from
            mlflow.log_artifact(str(DVC_LOCK))
        promotion = publish.promote(client, version, metrics, params, data_digest=lineage.data_digest())

    write_json(
        REGISTERED,
        {
            "model": f"models:/{store.REGISTERED_MODEL}/{version}",
            "run_id": run.info.run_id,
            "challenger": promotion.challenger,
            "new_version": existing is None,
            "artifacts_digest": digest,
            "champion": promotion.champion,
            "decision": promotion.decision,
        },
    )
    print(promotion.message())


if __name__ == "__main__":
    run_stage(main)
