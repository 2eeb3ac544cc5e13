"""README.md's commands work as written: each `make` command names a real target (make itself reads the
Makefile), each `dvc exp run` line names real params that validate together, and each predict line is
accepted by predict's own argument parser."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from helpers import overridden
from mnist_cnn.config import flat, load_params, validate
from mnist_cnn.serving import predict

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def commands() -> list[str]:
    """Every command the README shows: the lines of its code blocks (continuation lines joined, comments
    dropped) and its inline code spans."""
    blocks = re.findall(r"^```\w*\n(.*?)^```", README, re.MULTILINE | re.DOTALL)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", README, flags=re.MULTILINE | re.DOTALL))
    lines = [re.sub(r"(^|\s)#.*", "", line) for line in lines]
    return [" ".join(line.split()) for line in lines + spans if line.split()]


def starting_with(word: str) -> list[str]:
    found = sorted({command for command in commands() if command.split()[0] == word and len(command.split()) > 1})
    assert found, f"README.md shows no {word} command"
    return found


@pytest.mark.parametrize("command", starting_with("make"))
def test_each_make_command_names_a_real_target(command: str) -> None:
    """`make -n` reads the Makefile and prints the recipe without running it; an unknown target fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under make test
    make = ["make", "-n", *shlex.split(command)[1:]]
    result = subprocess.run(make, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_readme_shows_the_two_commands() -> None:
    assert {"make repro", "make test"} <= set(starting_with("make"))


def experiment_lines() -> list[str]:
    """The `dvc exp run` commands that set params (-S)."""
    return sorted({command for command in commands() if command.startswith("dvc exp run ") and " -S " in command})


@pytest.mark.parametrize("line", experiment_lines(), ids=lambda line: " ".join(line.split()[3:5]))
def test_the_experiments_are_valid_params(line: str) -> None:
    """What a newcomer copies from the README: each -S names a real key, and together they validate."""
    words = shlex.split(line)
    pairs = [words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "-S"]
    overrides = {key: yaml.safe_load(value) for key, value in pairs}
    assert set(overrides) <= set(flat(load_params(REPO / "params.yaml"))), line
    params = flat(validate(overridden(**overrides)))
    assert all(params[key] == value for key, value in overrides.items())


class Parsed(Exception):
    """Raised in place of parsing: carries predict's parser out of predict.main."""


def predict_parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    def hand_over(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", hand_over)
    with pytest.raises(Parsed) as parsed:
        predict.main([])
    monkeypatch.undo()
    return parsed.value.args[0]


@pytest.mark.parametrize("line", starting_with("mnist-cnn-predict"))
def test_each_predict_line_parses(
    line: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[line.split()[0]] == "mnist_cnn.serving.predict:cli"
    words = shlex.split(line)
    words = words[1 : words.index("<") if "<" in words else None]  # the shell's redirection is not an argument
    parser = predict_parser(monkeypatch)
    try:
        options = parser.parse_args(words)
    except SystemExit:  # argparse's way to reject a command line, its reason on stderr
        pytest.fail(f"{line}: {capsys.readouterr().err.strip()}")
    assert options.images
