"""params.yaml validation (src/mnist_cnn/config.py): every mistake is one UserError naming the key."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import overridden, stage_error, tool_env
from mnist_cnn.cli import UserError, run_stage
from mnist_cnn.config import Params, flat, load_params, validate
from mnist_cnn.stages import preprocess

REPO = Path(__file__).resolve().parents[1]
PARAMS_YAML = REPO / "params.yaml"


@pytest.fixture(scope="module")
def raw_params() -> dict[str, Any]:
    """The repo's params.yaml, parsed but not validated (tests deep-copy before mutating)."""
    return yaml.safe_load(PARAMS_YAML.read_text())


def without(raw: dict[str, Any], path: str) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    *parents, leaf = path.split(".")
    node = out
    for part in parents:
        node = node[part]
    del node[leaf]
    return out


def user_error(raw: Any) -> str:
    with pytest.raises(UserError) as caught:
        validate(raw)
    return str(caught.value)


# --- the real params.yaml ---------------------------------------------------


def yaml_leaves(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(yaml_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_repo_params_yaml_validates(raw_params: dict[str, Any]) -> None:
    params = load_params(PARAMS_YAML)
    assert isinstance(params, Params)
    # Every key of the file is in the model and every field of the model is in the file, with the file's value.
    leaves = yaml_leaves(raw_params)
    assert flat(params) == leaves
    assert {"seed", "augment", "data.verify_sha256", "train.epochs", "train.lr"} <= set(leaves)
    assert isinstance(params.train.lr, float)
    assert isinstance(params.data.timeout_s, float)
    assert isinstance(params.train.epochs, int)


def test_params_are_frozen(raw_params: dict[str, Any]) -> None:
    params = validate(raw_params)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type is an implementation detail
        params.train.epochs = 99  # type: ignore[misc]
    assert params.train.epochs == raw_params["train"]["epochs"]


def test_empty_sources_mean_skip(raw_params: dict[str, Any]) -> None:
    params = validate(overridden(raw_params, data__npm_package="", data__mirrors=[]))
    assert params.data.npm_package == ""
    assert params.data.mirrors == []


def test_int_lr_is_accepted_as_float(raw_params: dict[str, Any]) -> None:
    # YAML reads `lr: 1` as an int; it is a valid learning rate.
    params = validate(overridden(raw_params, train__lr=1))
    assert params.train.lr == 1.0
    assert isinstance(params.train.lr, float)


# --- unknown and missing keys -------------------------------------------------


def test_extra_key_beside_the_right_one_gets_did_you_mean(raw_params: dict[str, Any]) -> None:
    message = user_error(overridden(raw_params, train__epoch=5))
    assert "unknown key 'train.epoch'" in message
    assert "did you mean 'epochs'?" in message


def test_unknown_top_level_key_gets_did_you_mean(raw_params: dict[str, Any]) -> None:
    message = user_error(overridden(raw_params, augmnet=True))
    assert "unknown key 'augmnet'" in message
    assert "did you mean 'augment'?" in message


def test_unknown_key_with_nothing_close_has_no_suggestion(raw_params: dict[str, Any]) -> None:
    message = user_error(overridden(raw_params, data__zzzzzz=1))
    assert "unknown key 'data.zzzzzz'" in message
    assert "did you mean" not in message


def test_misspelt_key_gets_did_you_mean(raw_params: dict[str, Any]) -> None:
    raw = copy.deepcopy(raw_params)
    raw["train"]["epoch"] = raw["train"].pop("epochs")  # what a typo in params.yaml looks like
    message = user_error(raw)
    assert "'train.epoch'" in message
    assert "did you mean 'epochs'?" in message


@pytest.mark.parametrize("key", ["seed", "data", "train.lr", "data.verify_sha256"])
def test_missing_key_is_named(raw_params: dict[str, Any], key: str) -> None:
    assert user_error(without(raw_params, key)) == f"params: missing key '{key}'"


# --- wrong types and out-of-range values --------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.epochs", "5"),  # strict: no string -> int coercion
        ("augment", 1),  # strict: no int -> bool coercion
        ("augment", "yes"),
        ("train.epochs", 5.0),
        ("train.lr", "0.001"),
        ("train.lr", True),  # bool is not a number here
        ("train.device", "gpu"),
        ("train.precision", "fp16"),
        ("model.depth", 4),
        ("model.depth", "3"),
        ("data.mirrors", "https://example.org/"),
        ("data.mirrors", ["https://example.org/", 3]),
        ("data", [1, 2]),
        ("seed", None),
    ],
)
def test_wrong_type_is_named(raw_params: dict[str, Any], key: str, value: Any) -> None:
    message = user_error(overridden(raw_params, **{key: value}))
    assert message.startswith(f"params: '{key}")
    assert repr(value) in message or key in ("data.mirrors", "data")


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("train.epochs", 0, "greater than or equal to 1"),
        ("train.batch_size", 0, "greater than or equal to 1"),
        ("train.eval_batch_size", -1, "greater than or equal to 1"),
        ("train.lr", 0, "greater than 0"),
        ("train.lr", -1, "greater than 0"),
        ("train.lr", 0.0, "greater than 0"),
        ("train.lr", math.nan, "finite"),
        ("train.lr", math.inf, "finite"),
        ("data.timeout_s", 0, "greater than 0"),
        ("data.timeout_s", -math.inf, "finite"),
        ("data.subset", -1, "greater than or equal to 0"),
        ("seed", -1, "greater than or equal to 0"),
    ],
)
def test_out_of_range_is_named(raw_params: dict[str, Any], key: str, value: Any, words: str) -> None:
    message = user_error(overridden(raw_params, **{key: value}))
    assert message.startswith(f"params: '{key}': ")
    assert words in message, message


def test_nan_from_yaml_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_YAML.read_text().replace("lr: 0.001", "lr: .nan"))
    assert "lr: .nan" in path.read_text()  # the replacement really happened
    with pytest.raises(UserError, match=r"'train\.lr': .*\(got nan\)"):
        load_params(path)


def test_int_too_big_for_a_float_is_a_user_error(raw_params: dict[str, Any]) -> None:
    with pytest.raises(UserError, match=r"train\.lr"):
        validate(overridden(raw_params, train__lr=10**400))


# --- file-level problems ------------------------------------------------------


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    lines = PARAMS_YAML.read_text().splitlines()
    bad_line = next(i for i, line in enumerate(lines) if line.strip().startswith("epochs:"))
    lines[bad_line] = "  epochs: [5"  # unclosed flow sequence
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as caught:
        load_params(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: YAML syntax error at line ")
    # The parser notices the problem on the broken line or just after it.
    reported = int(message.split(" at line ")[1].split(",")[0])
    assert bad_line + 1 <= reported <= bad_line + 2, message


def test_tab_indentation_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\ntrain:\n\tepochs: 5\n")
    with pytest.raises(UserError, match=r"YAML syntax error at line 3, column 1"):
        load_params(path)


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- seed\n- augment\n", "list"), ("just a string\n", "str"), ("42\n", "int")],
)
def test_non_mapping_file(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_params(path)
    assert str(caught.value) == f"{path}: expected a mapping of keys, got {kind}"


def test_empty_file_reports_a_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(UserError, match=r"missing key 'seed'"):
        load_params(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match=r"nope\.yaml: cannot read \(No such file or directory\)"):
        load_params(path)


# --- run_stage ----------------------------------------------------------------


def test_run_stage_user_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def main() -> None:
        raise UserError("params.yaml: 'train.lr': bad")

    with pytest.raises(SystemExit) as caught:
        run_stage(main)
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == "error: params.yaml: 'train.lr': bad\n"
    assert captured.out == ""


def test_run_stage_keyboard_interrupt_exits_130(capsys: pytest.CaptureFixture[str]) -> None:
    def main() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as caught:
        run_stage(main)
    assert caught.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_run_stage_does_not_hide_bugs() -> None:
    # Only UserError is the user's to fix; a programming error must keep its traceback.
    def main() -> None:
        raise ZeroDivisionError("a real bug")

    with pytest.raises(ZeroDivisionError):
        run_stage(main)


def test_run_stage_success_returns_normally() -> None:
    calls: list[int] = []
    run_stage(lambda: calls.append(1))
    assert calls == [1]


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (lambda text: text.replace("lr: 0.001", "lr: -1"), "'train.lr'"),
        (lambda text: text.replace("augment: true", "augment: 1"), "'augment'"),
        (lambda text: text.replace("batch_size: 64", "batch_size: [64"), "YAML syntax error at line"),
    ],
    ids=["out-of-range", "wrong-type", "yaml-syntax"],
)
def test_a_stage_prints_one_line_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], edit: Any, names: str
) -> None:
    original = PARAMS_YAML.read_text()
    broken = edit(original)
    assert broken != original, "the edit must change params.yaml"
    (tmp_path / "params.yaml").write_text(broken)
    monkeypatch.chdir(tmp_path)
    line = stage_error(preprocess.main, capsys)
    assert line.startswith("error: params.yaml: "), line
    assert names in line
    # Validation happens before any work: nothing was written.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_stage_process_prints_one_line_without_traceback_and_exits_2(tmp_path: Path) -> None:
    """The one real process: `python -m mnist_cnn.<stage>` on a bad params.yaml (the in-process
    tests of every stage's errors rely on run_stage behaving so in a real process)."""
    (tmp_path / "params.yaml").write_text(PARAMS_YAML.read_text().replace("lr: 0.001", "lr: -1"))
    result = subprocess.run(
        [sys.executable, "-m", "mnist_cnn.stages.preprocess"],
        cwd=tmp_path,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: params.yaml: ") and "'train.lr'" in lines[0], lines[0]
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# --- properties ---------------------------------------------------------------

# Every key of the repo's params.yaml, sections included (so new params are covered automatically).
_RAW = yaml.safe_load(PARAMS_YAML.read_text())
LEAVES = sorted({*yaml_leaves(_RAW), *(key for key, value in _RAW.items() if isinstance(value, dict))})

# Ints stay below 2**1000 here; the overflow case has its own test above.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**1000), max_value=2**1000),
    st.integers(min_value=-3, max_value=3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["auto", "cpu", "cuda", "fp32", "bf16", "", "5", "0.001", "true"]),
    st.binary(max_size=8),  # YAML's !!binary
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none()), inner, max_size=4),
    ),
    max_leaves=8,
)


def expect_params_or_user_error(raw: Any) -> Params | None:
    try:
        return validate(raw)
    except UserError as error:
        message = str(error)
        assert message.startswith("params: ")
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(LEAVES), value=values)
def test_mutating_one_leaf_gives_params_or_user_error(raw_params: dict[str, Any], key: str, value: Any) -> None:
    params = expect_params_or_user_error(overridden(raw_params, **{key: value}))
    if params is not None and "." in key:
        # Accepted: the stored value is the one given (ints widened to float for float fields).
        stored = flat(params)[key]
        assert stored == (float(value) if isinstance(stored, float) and isinstance(value, int) else value)
        assert not isinstance(value, bool) or isinstance(stored, bool)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(LEAVES),
    action=st.sampled_from(["delete", "extra", "rename"]),
    name=st.text(alphabet=st.characters(categories=["L", "N"]), min_size=1, max_size=12),
    value=values,
)
def test_structural_mutation_gives_user_error(
    raw_params: dict[str, Any], key: str, action: str, name: str, value: Any
) -> None:
    raw = copy.deepcopy(raw_params)
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    if name in node:
        return  # not a mutation
    if action == "delete":
        del node[leaf]
    elif action == "extra":
        node[name] = value
    else:
        node[name] = node.pop(leaf)
    assert expect_params_or_user_error(raw) is None  # every such change is invalid


@settings(max_examples=200, deadline=None)
@given(raw=values)
def test_any_value_at_top_level_gives_params_or_user_error(raw: Any) -> None:
    expect_params_or_user_error(raw)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_file_gives_params_or_user_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_params(path)
    except UserError as error:
        assert str(error).startswith(f"{path}: ")


def test_non_utf8_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(PARAMS_YAML.read_bytes().replace(b"device: auto", b"device: \xe9"))
    with pytest.raises(UserError, match=r"params\.yaml"):
        load_params(path)


def test_error_message_is_one_line_even_for_odd_keys(raw_params: dict[str, Any]) -> None:
    message = user_error(overridden(raw_params, **{"train.epochs\nx": 5}))
    assert "\n" not in message


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ({"augment": False, "augment_thickness": 0.5}, "augment_thickness need augment: true"),
        ({"augment": False, "augment_noise": 0.1, "augment_erase": 0.5}, "augment_erase, augment_noise need augment"),
        ({"augment_scale": 1.0}, "'augment_scale'"),
        ({"augment_thickness": -0.1}, "'augment_thickness'"),
        ({"augment_blur": 4.0}, "'augment_blur'"),
        ({"augment_invert": 1.5}, "'augment_invert'"),
        ({"augment_noise": "0.1"}, "'augment_noise'"),
        ({"augment_consistency": 12.0}, "augment_consistency needs one of augment_blur"),
        ({"augment": False, "augment_consistency": 12.0}, "augment_consistency need augment: true"),
        ({"augment_consistency": -1.0}, "'augment_consistency'"),
    ],
)
def test_bad_augmentation_extras_are_one_clear_error(top: dict[str, Any], expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        validate(overridden(**top))
