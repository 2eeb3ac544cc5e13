"""Tools around the pipeline: the training benchmark, the ablation summary, the load tester, the DVC remote check."""
