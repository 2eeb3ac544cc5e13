"""dvc.yaml: every stage output is in DVC's cache. DVC deletes a stage's outputs before it runs the
stage's command; an output kept out of the cache (`cache: false`) and deleted by a run that then
stopped (a bad param) could not be restored by `dvc checkout`. tests/e2e/test_pipeline.py restores
them after such a run."""

from __future__ import annotations

import yaml

from helpers import REPO


def test_every_output_of_every_stage_is_cached() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    uncached = []
    for name, stage in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
                if (options or {}).get("cache", True) is not True or (options or {}).get("persist"):
                    uncached.append(f"{name}: {path}")
    assert uncached == []
    assert any("metrics" in stage for stage in stages.values())  # the check saw the small outputs
