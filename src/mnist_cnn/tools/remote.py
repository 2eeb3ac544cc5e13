"""Is the DVC remote there? One clear line before `dvc pull` / `dvc push` (`make pull`, `make push`).

`dvc pull` from a remote it cannot reach reports missing cache files and hides the cause unless run
with -v. This asks the remote itself, through DVC's filesystem, and names the remote, its URL and the cause.
"""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request

from dvc.data_cloud import Remote
from dvc.exceptions import DvcException
from dvc.repo import Repo

from mnist_cnn.cli import UserError, run_stage


def _exists(remote: Remote) -> bool:
    """Ask the remote for its root. Raises when it cannot be asked."""
    if remote.fs.protocol in ("http", "https"):
        # DVC's HTTP filesystem turns a refused connection into "not found": ask directly.
        try:
            urllib.request.urlopen(urllib.request.Request(remote.path, method="HEAD"), timeout=10)
        except urllib.error.HTTPError:
            pass  # the server answered (404 for a directory URL is normal)
        except urllib.error.URLError as error:
            raise ConnectionError(str(error.reason)) from None
        return True
    return remote.fs.exists(remote.path)


def check(name: str | None = None) -> str:
    """Raise UserError unless the remote (default: the repository's default) answers; return its URL."""
    try:
        with Repo() as repo:
            remote = repo.cloud.get_remote(name, command="pull")
            url = repo.config["remote"][remote.name]["url"]
            where = f"DVC remote '{remote.name}' ({url})"
            try:
                exists = _exists(remote)
            except Exception as error:  # each filesystem raises its own (aiohttp, botocore, paramiko, OSError)
                cause = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise UserError(f"{where} is unreachable: {cause}") from None
            # Object stores have no directories: only a local path can be absent yet reachable.
            if not exists and remote.fs.protocol in ("local", "file"):
                raise UserError(f"{where}: no such directory (is the share mounted?)")
            return url
    except (DvcException, ImportError) as error:  # ImportError: e.g. s3:// without the dvc-s3 plugin
        raise UserError(" ".join(str(error).split())) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mnist_cnn.tools.remote", description=__doc__.split("\n")[0])
    parser.add_argument("-r", "--remote", help="remote name (default: the repository's default remote)")
    args = parser.parse_args(argv)
    print(f"DVC remote reachable: {check(args.remote)}")


if __name__ == "__main__":
    run_stage(main)
