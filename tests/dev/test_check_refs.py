"""dev/check_refs.py: every path, module and make target the docs name resolves, or the check names it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_refs", REPO / "dev" / "check_refs.py")
assert spec and spec.loader
check_refs = sys.modules["check_refs"] = importlib.util.module_from_spec(spec)  # dev/ is no package
spec.loader.exec_module(check_refs)

# A small repository whose README names only what exists (or what the pipeline creates).
GOOD = """\
# title

Code in `src/mnist_cnn/files.py` (`files.atomic_path`, `mnist_cnn.files.Writer.close`), run as
`python -m mnist_cnn.files`; `core/model.py` relative to the package; `model.py`; [docs](docs/a.md),
[its part](docs/a.md#the-first-part-ok), [here](#title).

```sh
make test        # the target exists
UPGRADE=torch make lint
```

Outputs: `reports/confusion_matrix.png`, `models/*.pt`, `mlruns/mlflow.db`; params: `train.epochs`;
a tag the code writes: `train.bf16`. Not paths: https://example.org/x/gone.py, `<run id>/model`,
`tests/<package>/test_<module>.py`, on/off, 1,000 img/s, `torch.compile`, `/usr/bin/chromium`.
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    files = {
        "README.md": GOOD,
        "docs/a.md": "# A\n\n## The first part (ok)\n\nBack to [the README](../README.md).\n",
        "Makefile": ".PHONY: test lint\ntest lint: setup\n\techo `make lint`\nsetup:\n\ttrue\n",
        ".ci/run": "#!/bin/sh\nmake test\n",
        "tests/ui/package.json": '{"description": "for tests/e2e/test_ui.py"}\n',
        "tests/e2e/test_ui.py": "",
        "dvc.yaml": "stages:\n  train:\n    cmd: x\n    outs:\n      - models/model.pt\n      - reports\n",
        "params.yaml": "train:\n  epochs: 5\n",
        "src/mnist_cnn/__init__.py": "",
        "src/mnist_cnn/files.py": "def atomic_path():\n    pass\n\n\nclass Writer:\n    def close(self): ...\n",
        "src/mnist_cnn/core/__init__.py": "",
        "src/mnist_cnn/core/model.py": "from mnist_cnn.files import atomic_path\n\nTAG = 'train.bf16'\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def add_line(repo: Path, name: str, line: str) -> int:
    """Append a line to a file of the repository; its line number."""
    path = repo / name
    text = path.read_text() + line + "\n"
    path.write_text(text)
    return text.count("\n")


def test_the_repository_has_no_dangling_reference() -> None:
    assert [str(found) for found in check_refs.check(REPO)] == []


def test_real_paths_modules_targets_outputs_and_params_are_accepted(repo: Path) -> None:
    assert check_refs.check(repo) == []


@pytest.mark.parametrize(
    ("line", "kind", "ref"),
    [
        ("The loader is `src/mnist_cnn/loader.py`.", "path", "src/mnist_cnn/loader.py"),
        ("A page that moved: docs/gone.md.", "path", "docs/gone.md"),
        ("Relative to the package: `serving/picture.py`.", "path", "serving/picture.py"),
        ("A link [gone](docs/b.md).", "path", "docs/b.md"),
        ("An anchor [gone](docs/a.md#the-second-part).", "anchor", "docs/a.md#the-second-part"),
        ("A function `mnist_cnn.files.move` that is not there.", "module", "mnist_cnn.files.move"),
        ("A short one: `files.move`.", "module", "files.move"),
        ("A method: `mnist_cnn.files.Writer.open`.", "module", "mnist_cnn.files.Writer.open"),
        ("Run `python -m mnist_cnn.evalsets.ood`.", "module", "mnist_cnn.evalsets.ood"),
        ("Then `make tset`.", "make target", "tset"),
        ("The file `train_step.py`.", "file", "train_step.py"),
        ("An output nobody makes: `models/weights.pt`.", "path", "models/weights.pt"),
    ],
)
def test_a_dangling_reference_is_named_with_its_file_and_line(repo: Path, line: str, kind: str, ref: str) -> None:
    number = add_line(repo, "README.md", line)
    found = check_refs.check(repo)
    assert [(f.file, f.line, f.kind, f.ref) for f in found] == [("README.md", number, kind, ref)]


def test_makefile_ci_and_ui_files_are_read(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    makefile = add_line(repo, "Makefile", "# `make bench` runs tests/test_bench.py")
    ci = add_line(repo, ".ci/run", "python -m mnist_cnn.tools.bench")
    (repo / "tests/e2e/test_ui.py").unlink()
    assert check_refs.main(repo) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"Makefile:{makefile}: path 'tests/test_bench.py'",
        f"Makefile:{makefile}: make target 'bench'",
        f".ci/run:{ci}: module 'mnist_cnn.tools.bench'",
        "tests/ui/package.json:1: path 'tests/e2e/test_ui.py'",
        "error: 4 dangling reference(s) in README.md, docs/, Makefile, .ci/run or tests/ui/",
    ]


def test_a_clean_repository_exits_0(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_refs.main(repo) == 0
    assert capsys.readouterr().out == ""


def test_a_file_cited_at_an_earlier_commit_is_not_a_reference(repo: Path) -> None:
    add_line(repo, "README.md", "A script removed since (`git show 1286e00:dev/gone/measure.py`).")
    assert check_refs.check(repo) == []
