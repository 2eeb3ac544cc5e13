"""The second repository's scenarios (e2e/conftest.py), one fixture each: a `dvc repro` killed by
SIGKILL mid-training, the `dvc repro` that recovers, two experiments run by DVC's queue with 2 parallel
workers on one sqlite store (one of them the README's preset), and `dvc exp apply` of the preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import all_runs, make_params, run, store_client
from mnist_cnn.registry import gate, publish


def test_kill_9_during_training_leaves_a_running_run_and_no_model(killed_repro: dict) -> None:
    assert b"mnist_cnn.stages.train" in killed_repro["killed_cmdline"]  # the run's pid tag named our own grandchild
    assert killed_repro["killed_repro_exit"] != 0
    assert "failed to reproduce 'train'" in killed_repro["killed_repro_log"], killed_repro["killed_repro_log"]
    # What kill -9 leaves: no model, and a run still RUNNING (its process had no chance to end it).
    assert not killed_repro["model_after_kill"]
    assert killed_repro["status_after_kill"] == "RUNNING"


def test_repro_after_a_kill_recovers_and_marks_the_dead_run_failed(killed_repro: dict, recovered_repro: dict) -> None:
    client = store_client(recovered_repro["repo"])
    killed = client.get_run(killed_repro["killed_id"])
    assert killed.info.status == "FAILED"
    assert "ended_by" in killed.data.tags
    assert killed.info.end_time is not None
    new = client.get_run(recovered_repro["run_id"])
    assert new.info.run_id != killed_repro["killed_id"]
    assert new.info.status == "FINISHED"
    assert recovered_repro["model_exists"]
    assert recovered_repro["temp_files"] == []
    assert recovered_repro["status"] == {}


def test_parallel_queued_experiments_all_land_in_the_store(killed_repro: dict, queued_experiments: dict) -> None:
    """Two queued experiments run by 2 parallel workers, beside the recovered `dvc repro`."""
    repo, output = queued_experiments["repo"], queued_experiments["run_all_output"]
    assert "Failed to reproduce" not in output, output
    assert "database is locked" not in output, output
    assert queued_experiments["queue_status"].count("Success") == 2, queued_experiments["queue_status"]

    client = store_client(repo)
    everything = all_runs(client)
    # Besides the killed run: the recovered repro and the queue's two (queued-1, the README's preset).
    runs = [r for r in everything if r.info.run_id != killed_repro["killed_id"]]
    assert len(runs) == len(everything) - 1 == 3, [(r.info.run_id, r.info.status) for r in everything]
    assert sorted(r.data.tags.get("dvc.exp_name", "") for r in runs) == ["", "improved", "queued-1"]
    assert sorted(int(r.data.params["seed"]) for r in runs) == [1, 2, 42]
    for r in runs:
        assert r.info.status == "FINISHED", r.info
        for key in ("epoch/train_loss", "epoch/test_loss", "epoch/test_accuracy"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1, 2], (r.info.run_id, key)
        assert "test_accuracy" in r.data.metrics
        # Each queued experiment's stages ran in its own `dvc exp exec-run`: one execution, one run.
    versions = client.search_model_versions("name='mnist-cnn'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
    # Promotions that overlapped still leave the gate's choice from all versions as champion.
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    margin = gate.margins(make_params().register)
    expected = publish.current_choice(client, "mnist-cnn", margin).champion
    assert str(champion.version) == expected, [(v.version, v.tags) for v in versions]
    assert len({r.data.tags["pipeline.execution"] for r in runs}) == 3


def test_experiments_run_the_code_of_their_snapshot(queued_experiments: dict) -> None:
    """A queued experiment runs the code it was queued with, even if the workspace is edited before
    the queue starts (the stages put the copy's src/ first on PYTHONPATH)."""
    for logs in queued_experiments["queue_logs"].values():
        assert "code: as committed" in logs
        assert "edited after queueing" not in logs


def test_the_readme_preset_runs_the_whole_pipeline(queued_experiments: dict, applied_preset: Path) -> None:
    """The preset, with the README's options, applied to the workspace: every later stage loads the
    improved network from the architecture saved with its weights, and evaluates exactly what
    training measured."""
    repo = applied_preset
    assert "-S" in queued_experiments["preset_command"]
    assert "Running stage 'train'" in queued_experiments["queue_logs"]["improved"]
    assert yaml.safe_load((repo / "params.yaml").read_text())["model"]["depth"] == 3  # exp apply
    checkpoint = torch.load(repo / "models/model.pt", weights_only=True)
    assert checkpoint["arch"] == {"batchnorm": True, "dropout": 0.1, "depth": 3}
    assert "block3.1.running_mean" in checkpoint["state_dict"]  # the third block, with its BatchNorm
    trained = (repo / "plots/train_history.csv").read_text().splitlines()[-1].split(",")  # the last epoch
    evaluated = json.loads((repo / "metrics/eval.json").read_text())
    assert evaluated["test_accuracy"] == pytest.approx(float(trained[3]), abs=1e-6)
    assert evaluated["test_loss"] == pytest.approx(float(trained[2]), rel=1e-5)
    assert (repo / "reports/confusion_matrix.png").stat().st_size > 0
    assert "improved" in run(["dvc", "exp", "list", "--all-commits", "--name-only"], repo).stdout.split()
