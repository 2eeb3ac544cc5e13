"""paths.py's promise: every file a stage writes is under its working directory. The download,
preprocess and train stages run as `dvc repro` runs them, with the data source, HOME and TMPDIR
outside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tool_env, write_params, write_synthetic_mnist


def snapshot(root: Path, skip: Path) -> dict[Path, tuple[int, int]]:
    return {
        p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file() and skip not in p.parents
    }


@pytest.mark.slow
def test_stages_write_only_inside_the_working_directory(tmp_path: Path) -> None:
    """data.source_dir outside the working directory is read, never written; no file is left in
    TMPDIR; anything else outside the working directory could only be a tool's cache under HOME."""
    work, source, home, tmp = (tmp_path / name for name in ("work", "source", "home", "tmp"))
    write_synthetic_mnist(source, n_train=400, n_test=100)
    home.mkdir()
    tmp.mkdir()
    write_params(work, source, train__epochs=1)
    before = snapshot(tmp_path, skip=work)
    env = tool_env(HOME=str(home), TMPDIR=str(tmp), XDG_CACHE_HOME=str(home / ".cache"))
    for name in ("download", "preprocess", "train"):
        command = [sys.executable, "-m", f"mnist_cnn.stages.{name}"]
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{name}:\n{result.stderr}"
    after = snapshot(tmp_path, skip=work)
    assert {p: s for p, s in after.items() if source in p.parents} == {
        p: s for p, s in before.items() if source in p.parents
    }
    assert [p for p in tmp.rglob("*") if p.is_file()] == []  # (torch leaves an empty torchinductor_<user>/)
    outside = sorted(str(p.relative_to(tmp_path)) for p, s in after.items() if before.get(p) != s)
    assert all(p.startswith(("home/.cache/", "home/.config/")) for p in outside), outside
    assert {p.name for p in work.iterdir()} == {"params.yaml", "data", "models", "metrics", "plots", "mlruns"}
