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

# S3's answers to a key pair it does not accept (a refusal to the right key is AccessDenied).
CREDENTIAL_ERRORS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken")


def _s3_refusal(remote: Remote) -> str | None:
    """Ask an S3 bucket for one key under the remote's prefix, once. None when it answers, else why
    not (what to say after the remote's name). s3fs's own checks would answer a missing bucket with
    "not found" like an empty prefix, and a wrong key pair with a bare "Forbidden"."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    args = dict(remote.fs.fs_args)
    # One attempt (the default retries a refused connection for seconds): a check, not a transfer.
    args["config_kwargs"] = {**args.get("config_kwargs", {}), "retries": {"max_attempts": 1}}
    s3 = type(remote.fs.fs)(**{**args, "skip_instance_cache": True})
    s3.retries = 1  # s3fs's own loop around botocore's
    bucket, _, prefix = remote.path.partition("/")
    try:
        s3.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except EndpointConnectionError as error:  # its message has the request's query string
        raise ConnectionError(f"could not connect to {error.kwargs['endpoint_url'].split('?')[0]}") from None
    except Exception as error:
        client_error = error if isinstance(error, ClientError) else error.__cause__
        if not isinstance(client_error, ClientError):
            raise  # no answer: unreachable
        code = client_error.response["Error"].get("Code", "")
        message = client_error.response["Error"].get("Message", str(client_error))
        if code == "NoSuchBucket":
            return f"no such bucket '{bucket}'"
        if code in CREDENTIAL_ERRORS:
            return f"refused the key pair ({code}: {message})"
        return f"{code}: {message}"
    return None


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
                refusal = _s3_refusal(remote) if remote.fs.protocol == "s3" else None
                exists = refusal is None and _exists(remote)
            except Exception as error:  # each filesystem raises its own (aiohttp, botocore, paramiko, OSError)
                cause = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise UserError(f"{where} is unreachable: {cause}") from None
            if refusal:
                raise UserError(f"{where}: {refusal}")
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
