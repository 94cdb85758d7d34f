"""Object-store URIs next to local paths: what the cluster's steps read and write.

`s3://BUCKET/KEY` and `minio://BUCKET/KEY` (KFP's name for its MinIO, an S3 API) go through pyarrow's
S3 filesystem, `gs://BUCKET/KEY` through its GCS filesystem; anything else is a local path (a PVC
mount included). The S3 endpoint and keys come from the usual environment variables, which the
pipeline fills from a Secret: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (e.g. KFP's
`http://minio-service.kubeflow:9000`; unset: AWS itself), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION / AWS_DEFAULT_REGION. GCS reads Google's default credentials.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

S3_SCHEMES = ("s3", "minio")
REMOTE_SCHEMES = (*S3_SCHEMES, "gs")


def is_remote(uri: str | Path) -> bool:
    return isinstance(uri, str) and uri.partition("://")[0] in REMOTE_SCHEMES and "://" in uri


def canonical(uri: str) -> str:
    """One name per object: KFP's `minio://` is the S3 bucket KServe and every S3 client call `s3://`."""
    scheme, sep, rest = uri.partition("://")
    return f"s3://{rest}" if sep and scheme == "minio" else uri


def _s3() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if not endpoint:
        return pafs.S3FileSystem(region=region)
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    # MinIO and other S3 servers name buckets in the path, not in the host name
    return pafs.S3FileSystem(region=region, endpoint_override=parts.netloc, scheme=parts.scheme, force_virtual_addressing=False)


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path within it."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    scheme, _, rest = str(uri).partition("://")
    if not rest.split("/", 1)[0]:
        raise ValueError(f"{uri}: no bucket in the URI (expected {scheme}://BUCKET/KEY)")
    return (_s3() if scheme in S3_SCHEMES else pafs.GcsFileSystem()), rest.rstrip("/")


def _info(uri: str | Path) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise OSError(f"{uri}: cannot reach the object store ({e})") from e
    return fs, path, info


def exists(uri: str | Path) -> bool:
    return _info(uri)[2].type != pafs.FileType.NotFound


def download(uri: str | Path, dest: str | Path) -> Path:
    """Copy the object or the folder (key prefix) at `uri` into the local folder `dest`; returns `dest`
    (a single object lands as `dest/NAME`)."""
    fs, path, info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: nothing there (no object, no folder)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(path).name if info.type == pafs.FileType.File else dest
    pafs.copy_files(path, str(target.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def upload(src: str | Path, uri: str) -> str:
    """Copy the local file or folder `src` to `uri` (a folder becomes a key prefix); returns `uri`."""
    fs, path = filesystem(uri)
    pafs.copy_files(str(Path(src).resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def read_bytes(uri: str | Path) -> bytes | None:
    """The object or file at `uri`, or None when there is none."""
    fs, path, info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Write `uri` whole: an S3 / GCS PUT replaces an object at once; a local file is replaced by a rename,
    so a reader never sees half of either."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
