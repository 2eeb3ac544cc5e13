"""MLflow: the store, the one run per pipeline execution, and dataset lineage."""
