"""The registry (src/mnist_cnn/registry/): the champion gate on a real MLflow sqlite store and a real
`mlflow server`, promotions in any order and all at once, a run's later version, and predict from the champion."""

from __future__ import annotations

import json
import multiprocessing
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric
from PIL import Image, ImageDraw

from helpers import TeamServer, make_params
from mnist_cnn.cli import run_stage
from mnist_cnn.core import refusal
from mnist_cnn.core.model import Net
from mnist_cnn.files import save_tensors
from mnist_cnn.registry import gate, publish
from mnist_cnn.serving import predict

CLEAN, OOD = gate.ACCURACY_TAG, "ood_accuracy"
EXPERIMENT = "registry-tests"
M = gate.margins(make_params().register)  # tests step in multiples of the margins, whatever params.yaml says


def metrics(
    clean: float, ood: float | None = None, geometric: float | None = None, photometric: float | None = None
) -> dict[str, float]:
    """Gate metrics whose group scores are these: each metric of a group at its group's score (None: none of them)."""
    given = {"clean": clean, "ood": ood, "geometric": geometric, "photometric": photometric}
    return {m: v for group, v in given.items() if v is not None for m in gate.GROUPS[group]}


BASE = metrics(0.9, 0.5, 0.5, 0.5)
SCORE = gate.scores(BASE)


def shifted(clean: float = 0, ood: float = 0, geometric: float = 0, photometric: float = 0) -> dict[str, float]:
    """BASE moved by the given number of margins on each group."""
    moved = {"clean": clean, "ood": ood, "geometric": geometric, "photometric": photometric}
    return metrics(*(SCORE[g] + n * M[g] for g, n in moved.items()))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real sqlite store for the module (creating one costs seconds); each test has its own model name.
    Its experiment keeps artifacts beside it (the store's default is ./mlruns of the working directory)."""
    previous = mlflow.get_tracking_uri()
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # what predict reads
        patch.setenv("DVC_EXP_BASELINE_REV", "abc123")  # provenance.git_commit() reads it first
        patch.delenv("DVC_EXP_NAME", raising=False)
        mlflow.set_tracking_uri(uri)
        MlflowClient().create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
        yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def client(store: str) -> MlflowClient:
    return MlflowClient()


@pytest.fixture
def name(client: MlflowClient, request: pytest.FixtureRequest) -> str:
    name = f"model-{request.node.name[:40]}"
    client.create_registered_model(name)
    return name


def new_versions(client: MlflowClient, name: str, count: int, trained_by: str | None = None) -> list[str]:
    """`count` versions, each from its own run with a tiny artifact (no training); `trained_by`: the runs'
    train_run_id tag (a later execution's run, registering a model that run trained)."""
    experiment = client.get_experiment_by_name(EXPERIMENT) or client.get_experiment(
        client.create_experiment(EXPERIMENT)
    )
    versions = []
    for _ in range(count):
        tags = {publish.TRAIN_RUN_TAG: trained_by} if trained_by else {}
        run = client.create_run(experiment.experiment_id, tags=tags)
        client.log_text(run.info.run_id, "tiny", "model/MLmodel")
        source = f"{run.info.artifact_uri}/model"
        versions.append(str(client.create_model_version(name, source, run.info.run_id).version))
    return versions


def record(client: MlflowClient, name: str, version: str, values: dict[str, float]) -> None:
    """The version's run gets these metrics, as the register stage logs them before promoting."""
    run_id = client.get_model_version(name, version).run_id
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in values.items()])


def promote(client: MlflowClient, name: str, version: str, values: dict[str, float], params=None, **kwargs):
    """record(), then publish.promote with the test's model name."""
    record(client, name, version, values)
    return publish.promote(client, version, values, params or make_params(), name=name, **kwargs)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def gate_tags(client: MlflowClient, name: str) -> dict[str, str]:
    return {str(v.version): v.tags.get("gate", "") for v in client.search_model_versions(f"name='{name}'")}


def test_champion_follows_the_gate(client: MlflowClient, name: str) -> None:
    full = make_params()
    steps = [  # (metrics, params, champion afterwards, words in the version's gate tag)
        (BASE, full, "1", ["promoted: first eligible version"]),
        (shifted(clean=2, ood=-2), full, "1", ["kept: ood ", " < ", "of version 1"]),  # better clean, worse OOD
        (shifted(clean=2, ood=2), full, "3", ["promoted: clean ", "; ood ", " > ", "of version 1"]),
        (shifted(2.25, 2.25, geometric=0.5, photometric=-0.5), full, "3", ["kept: none better than version 3"]),
        # Far better on photometric, but trading geometric for it beyond the margin: kept.
        (shifted(2, 2, geometric=-1.5, photometric=4), full, "3", ["kept: geometric ", " < ", "of version 3"]),
        (shifted(9, 9, 9, 9), make_params(data__subset=600), "3", ["kept: trained on a subset of 600"]),
        (
            metrics(SCORE["clean"] + 4 * M["clean"]),
            full,
            "7",
            ["promoted: clean", "geometric, photometric, ood, refusal, answered unknown"],
        ),
    ]
    challenger = None
    for number, (values, params, champion, words) in enumerate(steps, start=1):
        (version,) = new_versions(client, name, 1)
        assert version == str(number)
        promotion = promote(client, name, version, values, params)
        challenger = version if params.data.subset == 0 else challenger  # a subset model is nobody's challenger
        assert aliases(client, name) == {"challenger": challenger, "champion": champion}, promotion
        assert promotion.champion == champion
        assert promotion.champion_moved == (champion == version), promotion
        tag = client.get_model_version(name, version).tags["gate"]
        assert tag == promotion.decision
        assert all(word in tag for word in words), tag
        assert tag in promotion.message()
        assert (f"champion -> version {version}" in promotion.message()) == promotion.champion_moved

    # Version 2's model evaluated again (a later execution's run, train cached) with OOD now better: version 8
    # takes version 2's place, is promoted over 1, and 3 is compared with it.
    (again,) = new_versions(client, name, 1, trained_by=client.get_model_version(name, "2").run_id)
    promotion = promote(client, name, again, shifted(clean=2, ood=1.5), full)
    tags = gate_tags(client, name)
    assert promotion.decision.startswith("promoted:") and tags[again] == promotion.decision
    assert tags["2"].startswith("superseded by version 8 of the same trained model"), tags["2"]
    assert tags["3"].startswith("kept: none better than version 8"), tags["3"]  # +0.5 margin of OOD: within noise
    assert tags["4"].startswith("kept: none better than version 8"), tags["4"]
    assert tags["5"].startswith("kept: geometric") and tags["5"].endswith("of version 8"), tags["5"]
    assert aliases(client, name) == {"challenger": "8", "champion": "7"}
    assert "version 8" in tags["7"]


def test_tags_are_the_headline_metrics_commit_experiment_data_and_decision(
    client: MlflowClient, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version carries what a person scans (at most 9 tags with artifacts.digest); the gate reads the rest
    from its run."""
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lobe")
    (version,) = new_versions(client, name, 1)
    params = make_params(data__subset=600)
    given = metrics(0.9912, 0.875, 0.9431, 0.7512) | {"robust_mean_accuracy": 0.8}
    promotion = promote(client, name, version, given, params, data_digest="sha256:0f0f")
    tags = client.get_model_version(name, version).tags
    headline = {"test_accuracy", "ood_accuracy", "robust_mean_accuracy"}
    assert set(tags) == {*headline, "git.commit", "dvc.exp_name", "data.digest", "subset", "gate"}
    assert len(tags) + 1 <= 9  # and artifacts.digest, which log_and_register writes
    assert {m: float(tags[m]) for m in headline} == {m: given[m] for m in headline}
    assert (tags["git.commit"], tags["dvc.exp_name"], tags["data.digest"]) == ("abc123", "bushy-lobe", "sha256:0f0f")
    assert tags["subset"] == "600"
    # A smoke run is never champion, nor challenger.
    assert aliases(client, name) == {} and "challenger stays unset" in promotion.message()

    # Re-tagged after an evaluation on full data, without OOD, robustness, experiment or digest: those tags go.
    monkeypatch.delenv("DVC_EXP_NAME")
    client.set_model_version_tag(name, version, "robust_fog", "0.5")  # a copy older versions carried
    publish.promote(client, version, metrics(0.99), make_params(augment=False), name=name)
    tags = client.get_model_version(name, version).tags
    assert set(tags) == {"test_accuracy", "git.commit", "gate"}
    assert tags["gate"] == "promoted: first eligible version"
    assert aliases(client, name) == {"champion": version, "challenger": version}


def test_bad_metrics_are_refused_before_anything_is_written(client: MlflowClient, name: str) -> None:
    (version,) = new_versions(client, name, 1)
    for bad in ({OOD: 0.9}, {CLEAN: float("nan")}, {CLEAN: 0.9, OOD: float("inf")}):
        with pytest.raises(ValueError, match="promote: "):
            publish.promote(client, version, bad, make_params(), name=name)
    assert client.get_model_version(name, version).tags == {} and aliases(client, name) == {}


# Three versions where the gate is not transitive: 2 beats 1 (better OOD, clean within noise),
# 3 beats 2 (same), but 3 alone would not beat 1 (clean worse beyond the margin).
NOT_TRANSITIVE = [BASE, shifted(clean=-0.75, ood=2), shifted(clean=-1.5, ood=4)]


def test_the_final_champion_does_not_depend_on_the_order_of_promotions(client: MlflowClient) -> None:
    assert gate.gate(NOT_TRANSITIVE[2], NOT_TRANSITIVE[0], "1", M)[0] is False
    # Comparing each newcomer with the alias it finds would end at 2 for the order 1, 3, 2.
    results = []
    for order in ([1, 2, 3], [1, 3, 2], [3, 2, 1], [2, 3, 1]):
        name = "order-" + "".join(map(str, order))
        client.create_registered_model(name)
        new_versions(client, name, 3)
        for number in order:
            promote(client, name, str(number), NOT_TRANSITIVE[number - 1])
        results.append((aliases(client, name)["champion"], gate_tags(client, name)))
    assert {champion for champion, _ in results} == {"3"}  # the fold in version order: 1 -> 2 -> 3
    assert all(tags == results[0][1] for _, tags in results), results
    unknown = "(refusal, answered unknown, not compared)"  # the metrics above have no refusal rates
    assert results[0][1]["3"].endswith(f"of version 2, none worse beyond its margin {unknown}")


def test_a_trained_models_later_version_takes_the_place_of_its_first(client: MlflowClient, name: str) -> None:
    """A model evaluated again in a later execution (its refusal statistics redone, the same weights) is
    registered from that execution's run, tagged with the training run: the later version stands in the
    first one's place in the fold, so the champion moves to what the workspace now serves, and the first
    is superseded. Without that, a tie would keep the first version, with the old statistics."""
    first, other = new_versions(client, name, 2)
    promote(client, name, first, metrics(0.99))
    promote(client, name, other, metrics(0.99))
    assert aliases(client, name)["champion"] == first
    trained = client.get_model_version(name, first).run_id
    (again,) = new_versions(client, name, 1, trained_by=trained)
    promotion = promote(client, name, again, metrics(0.99))
    assert aliases(client, name) == {"champion": again, "challenger": again} and promotion.champion_moved
    tags = gate_tags(client, name)
    assert tags[first] == f"superseded by version {again} of the same trained model (run {trained})"
    assert tags[again] == "promoted: first eligible version" and tags[other].startswith("kept: none better")


def test_versions_without_accuracy_are_never_champion(client: MlflowClient, name: str) -> None:
    """A version registered by hand has no test_accuracy tag: the rule ignores it, and the champion
    alias, a function of the tagged versions, is recomputed at the next promotion."""
    manual, tagged = new_versions(client, name, 2)
    client.set_registered_model_alias(name, "champion", manual)
    promotion = promote(client, name, tagged, BASE)
    assert (promotion.previous, promotion.champion) == (manual, tagged)
    assert aliases(client, name) == {"champion": tagged, "challenger": tagged}
    assert "gate" not in client.get_model_version(name, manual).tags


BARRIER: list = []  # a process pool worker's start line, set by its initializer


def at_the_start_line(barrier: object) -> None:
    BARRIER.append(barrier)


def promote_together(uri: str, name: str, version: str, values: dict[str, float]) -> str:
    """One promotion in its own process (as a queued experiment's stage is), started when the other one starts."""
    BARRIER[0].wait(timeout=120)
    promotion = publish.promote(MlflowClient(uri), version, values, make_params(), name=name, exp_name="", commit="c")
    return promotion.decision


@pytest.mark.slow  # two processes, each importing mlflow
def test_two_promotions_at_once_on_the_sqlite_store(client: MlflowClient, store: str) -> None:
    """Two processes promote at the same moment, three times: the gate's choice wins every time, and
    neither fails (MLflow's sqlite store can fail one of two first-time alias settings: retried)."""
    names = [f"parallel-{i}" for i in range(3)]
    pairs = [(BASE, shifted(clean=3, ood=3)), (shifted(clean=3, ood=3), BASE), (BASE, shifted(clean=2, ood=-2))]
    for name, pair in zip(names, pairs, strict=True):
        client.create_registered_model(name)
        for version, values in zip(new_versions(client, name, 2), pair, strict=True):
            record(client, name, version, values)
    context = multiprocessing.get_context("spawn")  # no copies of this process's open database connections
    with context.Pool(2, initializer=at_the_start_line, initargs=(context.Barrier(2),)) as pool:
        for name, (first, second) in zip(names, pairs, strict=True):
            pool.starmap(promote_together, [(store, name, "1", first), (store, name, "2", second)], chunksize=1)
    expected = [gate.fold((gate.Candidate(str(v), m) for v, m in enumerate(pair, 1)), M) for pair in pairs]
    assert [e.champion for e in expected] == ["2", "1", "1"]
    assert [aliases(client, name)["champion"] for name in names] == [e.champion for e in expected]
    assert [gate_tags(client, name) for name in names] == [e.decisions for e in expected]


class JitteryClient:
    """An MlflowClient that pauses a random moment after each read: promotions that run together
    then interleave their reads and writes in many different orders."""

    def __init__(self, client: MlflowClient, seed: int) -> None:
        self._client, self._random = client, random.Random(seed)

    def __getattr__(self, attribute: str):
        method = getattr(self._client, attribute)
        if not attribute.startswith(("get_", "search_")):
            return method

        def read(*args: object, **kwargs: object) -> object:
            result = method(*args, **kwargs)
            time.sleep(self._random.uniform(0, 0.03))
            return result

        return read


def random_versions(rng: random.Random, count: int) -> list[gate.Candidate]:
    """Metrics a few margins apart and slowly improving, so that the gate keeps some versions and
    promotes others; one version trained on a subset, one without OOD and robustness numbers, one
    without one photometric metric."""
    found = []
    for number in range(1, count + 1):
        values = shifted(*(rng.uniform(-3, 3) + 0.5 * number for _ in range(4)))
        if number == 4:
            values = metrics(values[CLEAN])
        if number == 7:
            del values["robust_fog"]
        found.append(gate.Candidate(str(number), values, 600 if number == 5 else 0))
    return found


def promote_all_at_once(url: str, name: str, versions: list[gate.Candidate], rng: random.Random) -> None:
    """Promote every version, each in its own thread with its own client, in a shuffled order."""
    errors: list[BaseException] = []

    def promote(candidate: gate.Candidate, seed: float) -> None:
        try:
            params = make_params(data__subset=candidate.subset)
            jittery = JitteryClient(MlflowClient(url), seed)
            publish.promote(jittery, candidate.version, candidate.metrics, params, name=name, commit="c")  # type: ignore[arg-type]
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=promote, args=(c, rng.random())) for c in rng.sample(versions, len(versions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors


def test_predict_loads_the_champion_registered(
    client: MlflowClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The register stage's real log_model + promote, then predict through models:/mnist-cnn@champion,
    a version number and the checkpoint: the same answer."""
    torch.manual_seed(0)
    net = Net().eval()
    checkpoint = tmp_path / "model.pt"
    torch.save({"state_dict": net.state_dict(), "arch": net.arch}, checkpoint)
    pictures = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8)
    stats = refusal.fit(net, pictures, torch.arange(100) % 10, 0, make_params().evaluate)
    save_tensors(tmp_path / "refusal.pt", stats)  # beside the checkpoint, as evaluate leaves it
    example = np.zeros((2, 28, 28), dtype=np.uint8)
    with mlflow.start_run(experiment_id=client.get_experiment_by_name(EXPERIMENT).experiment_id) as run:
        digest = publish.artifacts_digest(checkpoint, tmp_path / "refusal.pt")
        version, _ = publish.log_and_register(net, stats, example, digest)
    assert publish.find_version(client, run.info.run_id, digest).version == int(version)
    assert publish.find_version(client, run.info.run_id, "another digest") is None
    promotion = publish.promote(client, version, metrics(0.5), make_params())  # the default name: mnist-cnn
    assert promotion.champion_moved and aliases(client, "mnist-cnn") == {"champion": "1", "challenger": "1"}

    picture = Image.new("L", (120, 90), 255)
    ImageDraw.Draw(picture).line([(40, 10), (40, 80)], fill=0, width=8)
    image = tmp_path / "one.png"
    picture.save(image)
    answers = []
    for model in ("models:/mnist-cnn@champion", str(checkpoint), "models:/mnist-cnn/1"):
        predict.main(["--model", model, "--json", str(image)])
        answers.append(json.loads(capsys.readouterr().out))
    for other in answers[1:]:
        assert answers[0]["digit"] == other["digit"]
        assert answers[0]["probability"] == pytest.approx(other["probability"], abs=1e-5)

    with pytest.raises(SystemExit) as exit_info:
        run_stage(lambda: predict.main(["--model", "models:/mnist-cnn@nonesuch", str(image)]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: models:/mnist-cnn@nonesuch: ")


def test_many_concurrent_promotions_against_a_server_end_at_the_rules_choice(server: TeamServer) -> None:
    """Rounds of 10 promotions, all at once, in shuffled order, through the real team `mlflow server`
    (one process; it serves requests in threads, so they reach the database concurrently): the final
    champion and every gate tag are always the fold of the final versions."""
    rng = random.Random(0)
    champions, promotions = [], []
    client = MlflowClient(server.url)
    for round_ in range(3):
        name = f"team-{round_}"
        client.create_registered_model(name)
        new_versions(client, name, 10)
        versions = random_versions(rng, 10)
        for candidate in versions:
            record(client, name, candidate.version, dict(candidate.metrics))
        promote_all_at_once(server.url, name, versions, rng)
        expected = gate.fold(versions, M)
        assert aliases(client, name)["champion"] == expected.champion, (expected, versions)
        assert gate_tags(client, name) == expected.decisions
        champions.append(expected.champion)
        promotions.append(sum(decision.startswith("promoted") for decision in expected.decisions.values()))
    # The draws make the champion move past the first version in every round, and end at different versions.
    assert min(promotions) >= 2 and len(set(champions)) > 1, (promotions, champions)


class SlowChampionReads:
    """An MlflowClient that pauses after reading the registered model (where promote looks up the
    champion): the widest possible window between a promotion's read and its write. `read` is set
    at its first read."""

    def __init__(self, client: MlflowClient, pause: float, read: threading.Event) -> None:
        self._client, self._pause, self._read = client, pause, read

    def get_registered_model(self, name: str):
        model = self._client.get_registered_model(name)
        self._read.set()
        time.sleep(self._pause)
        return model

    def __getattr__(self, attribute: str):
        return getattr(self._client, attribute)


def test_overlapping_promotions_leave_the_best_model_champion(client: MlflowClient, name: str) -> None:
    """Two evaluate stages promoting at once (parallel experiments): the better model must end
    champion, whichever reads first, and neither may fail."""
    better, worse = new_versions(client, name, 2)
    results: dict[str, object] = {}

    def promote(version: str, accuracy: float, pause: float, read: threading.Event) -> None:
        try:
            slow = SlowChampionReads(client, pause, read)
            results[version] = publish.promote(slow, version, metrics(accuracy), make_params(), name=name, commit="c")  # type: ignore[arg-type]
        except Exception as error:  # reported below
            results[version] = error

    # The better model reads first and writes first; the worse one reads before that write and writes last.
    better_read = threading.Event()
    threads = [
        threading.Thread(target=promote, args=(better, 0.9, 0.4, better_read)),
        threading.Thread(target=promote, args=(worse, 0.8, 0.8, threading.Event())),
    ]
    threads[0].start()
    assert better_read.wait(timeout=60)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(isinstance(r, publish.Promotion) for r in results.values()), results
    assert aliases(client, name)[gate.CHAMPION] == better, results
