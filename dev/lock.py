"""Regenerate requirements.lock from pyproject.toml: `make lock` (or `python dev/lock.py`).

pip resolves the project with all its extras (EXTRAS) for this platform, constrained by the current
lock, without installing anything (--dry-run --ignore-installed --report); the lock becomes the
exact version of every package in that resolution. Pins that still satisfy pyproject.toml stay as
they are, so a regeneration only adds what is new (a dependency, an extra). To move a pin, delete
its line first (`UPGRADE=torch make lock` does that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
# Every extra, resolved together, so that one lock holds whichever a machine installs.
EXTRAS = "dev,gpu,team,team-test"


def resolve(pins: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "constraints.txt").write_text(pins)
        report = Path(tmp) / "report.json"
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed"]
        constraints = ["-c", str(Path(tmp) / "constraints.txt")]
        subprocess.run([*pip, "--report", str(report), *constraints, "-e", f"{LOCK.parent}[{EXTRAS}]"], check=True)
        installs = json.loads(report.read_text())["install"]
    pins = {item["metadata"]["name"]: item["metadata"]["version"] for item in installs}
    pins.pop("mnist-cnn")  # the project itself, installed editable
    return [f"{name}=={version}" for name, version in sorted(pins.items(), key=lambda kv: kv[0].lower())]


def main() -> None:
    upgrade = {name.strip().lower() for name in os.environ.get("UPGRADE", "").split(",") if name.strip()}
    kept = [line for line in LOCK.read_text().splitlines() if line.split("==")[0].lower() not in upgrade]
    lines = resolve("\n".join(kept) + "\n")
    tmp = LOCK.with_suffix(".lock.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(LOCK)
    print(f"{LOCK.name}: {len(lines)} pins")


if __name__ == "__main__":
    main()
