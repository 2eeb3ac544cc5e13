"""Writing outputs safely: to a temp name beside the target, renamed over it only when complete. A failed
write (a full or read-only disk, a file where a directory should be) becomes one UserError naming the
output, and the earlier good file stays as it was. Reading the earlier stages' outputs, one error line too.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mnist_cnn.cli import UserError


def cannot_write(path: Path, error: OSError, refused: str | None = None) -> UserError:
    """The one-line error for an output that cannot be written, and the path the OS refused if another one."""
    where = f" ({refused})" if refused is not None and Path(refused) != path else ""
    return UserError(f"cannot write {path}: {error.strerror or error}{where}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only on success (an OSError: cannot_write)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise cannot_write(path, error, error.filename) from None
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.touch(exist_ok=False)  # a name of its own, and the mode open() gives (mkstemp's 0600 is too private)
    except OSError as error:
        raise cannot_write(path, error) from None
    try:
        try:
            yield tmp
        except OSError as error:  # writing the temp file: a full disk, a quota
            raise cannot_write(path, error) from None
        try:
            os.replace(tmp, path)
        except OSError as error:  # e.g. a directory where the file should be
            raise cannot_write(path, error) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, earlier: str) -> dict[str, Any]:
    """The JSON mapping that `earlier` writes: one UserError line if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        raise UserError(f"{path}: missing or unreadable (run {earlier} first)")
    return data


def read_int_columns(path: Path, earlier: str, *columns: str) -> list[np.ndarray]:
    """The named integer columns of a CSV with a header that `earlier` writes: one UserError line if the file
    is missing, unreadable or lacks a column."""
    try:
        with path.open() as file:
            header = file.readline().strip().split(",")
        table = np.loadtxt(
            path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2, usecols=[header.index(c) for c in columns]
        )
    except (OSError, ValueError):
        raise UserError(f"{path}: missing or unreadable (run {earlier} first)") from None
    return list(table.T)


def write_csv(path: Path, rows: list[dict[str, Any]], digits: int | None = None) -> None:
    """Rows of one shape as CSV with a header; floats rounded to `digits` decimals if given."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    if digits is not None:
        rows = [{k: round(v, digits) if isinstance(v, float) else v for k, v in row.items()} for row in rows]
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as PNG, then closed."""
    import matplotlib.pyplot as plt  # only the stages that draw pay for the import

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def save_tensors(path: Path, tensors: dict[str, Any]) -> None:
    # Serialised in memory, then written by Python: a failed write (full disk) is then an OSError
    # that atomic_path reports, not torch's "[enforce fail at inline_container.cc] unexpected pos".
    import torch  # here, not at the top: the download stage writes files without it

    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_tensors(path: Path) -> dict[str, Any]:
    """Load a dict of tensors; weights_only=True refuses pickled code. A missing, truncated or damaged
    file (an interrupted copy, a bad pull) is one UserError naming it and how to get it back."""
    import pickle
    import zipfile

    import torch

    if not path.exists():
        raise UserError(f"{path}: missing (run the earlier stages first: dvc repro)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a truncated copy is not one
        raise damaged(path, "not a whole torch.save archive")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message would suggest weights_only=False: not for an unknown file
        raise UserError(f"{path}: refused to load: it holds pickled objects besides tensors") from None
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as error:
        raise damaged(path, str(error)) from None
    if not isinstance(loaded, dict):
        raise damaged(path, f"a {type(loaded).__name__}, not a dict of tensors")
    return loaded


def damaged(path: Path | str, why: str) -> UserError:
    """The one line for a pipeline output that cannot be read: what is wrong and the two ways back."""
    first = why.splitlines()[0][:160] if why else "empty"
    return UserError(
        f"{path}: damaged or truncated ({first}): restore it with `dvc checkout --force {path}`, "
        "or rebuild it with `dvc repro`"
    )
