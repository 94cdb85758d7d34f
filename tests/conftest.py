"""Shared fixtures: where the real data sets are, and tiny data sets made on the spot."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """Path of a real data set in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data set {path} is absent (clone the project beside its shared/ folder to run this test)")
    return path


def loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(ready, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    """Poll `ready()` (False or an exception: not yet) until it holds; fail naming `what` if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except Exception:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (exit code {proc.poll()})")
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """End a server the fixture started, by its own PID."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto's server mode) on a free port of 127.0.0.1; stopped by its PID."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    import httpx

    port = loopback_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(endpoint, timeout=2), proc, f"moto server on {endpoint} (log: {log})")
        yield endpoint
    finally:
        stop_process(proc)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket on the local S3 server, reached the way a pipeline step reaches it: through the
    standard AWS variables (which subprocesses, such as kfp.local's steps, inherit). Returns its name."""
    import boto3  # moto's own dependency: the test creates the bucket as an operator would

    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    bucket = f"gts-lum-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="test-key", aws_secret_access_key="test-secret"
    ).create_bucket(Bucket=bucket)
    return bucket


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: on the PATH, or where Debian's postgresql puts them."""
    found = shutil.which("postgres")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((d for d in candidates if (d / "postgres").exists() and (d / "initdb").exists()), None)


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster on a free port of 127.0.0.1 (trust auth, no fsync); stopped by its PID.
    The server refuses to run as root, so as root it runs as Debian's `postgres` user. Yields its port."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (CI installs it through .ci/run: apt-get install postgresql)")
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")
    user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="gts-lum-pg-"))  # not under pytest's root-only tmp folders
    if user:
        shutil.chown(root, user, user)
    port = loopback_port()
    try:
        subprocess.run(
            [bindir / "initdb", "-D", root / "data", "-U", "gts", "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            user=user,
        )
        with open(root / "server.log", "wb") as out:
            proc = subprocess.Popen(
                [bindir / "postgres", "-D", root / "data", "-h", "127.0.0.1", "-p", str(port), "-k", root, "-F"],
                stdout=out,
                stderr=subprocess.STDOUT,
                user=user,
            )
        try:
            wait_for(
                lambda: psycopg.connect(f"postgresql://gts@127.0.0.1:{port}/postgres").close() is None,
                proc,
                f"PostgreSQL on port {port} (log: {root / 'server.log'})",
            )
            yield port
        finally:
            stop_process(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def postgres_database(port: int) -> str:
    """A new, empty database on the test server: its SQLAlchemy URL (the form Feast's SQL registry takes)."""
    import psycopg

    name = f"feast_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"postgresql://gts@127.0.0.1:{port}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://gts@127.0.0.1:{port}/{name}"


@pytest.fixture
def movielens_dir() -> Path:
    return shared_data("movielens-latest-small")


@pytest.fixture
def telco_dir() -> Path:
    return shared_data("telco-churn")


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs one worker a core), each worker and the processes it starts
    keep to one torch / OpenMP thread: two workers with a pool of two threads each fought over two cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["MKL_NUM_THREADS"] = "1"


@pytest.fixture
def one_torch_thread():
    """Small torch models on 2 shared cores: one intra-op thread beats a contended pool by up to 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_module():
    """`one_torch_thread` for module-scoped fixtures that train."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The cycle's behaviours differ only in their words; the ids are opaque to text-reading models.
CYCLE_TEXTS = [
    "watch a football match",
    "stream a music album",
    "call the family",
    "read the morning news",
    "play an online game",
    "pay the phone bill",
]
# Never in the events: two share a text, one has its own.
CYCLE_EXTRA = {"twin_a": "top up prepaid credit", "twin_b": "top up prepaid credit", "single": "roam abroad on holiday"}


@pytest.fixture(scope="session")
def cycle_data(tmp_path_factory):
    """A sequence data set made by the real stages: 40 users walk a 6-behaviour cycle, one event an hour."""
    import numpy as np
    import pandas as pd

    from gts_lum.data.contract import DatasetManifest
    from gts_lum.data.validate import validate_dataset
    from gts_lum.sequence.dataset import SequenceDataset, build_sequence_dataset

    root = tmp_path_factory.mktemp("cycle")
    raw = root / "raw"
    raw.mkdir()
    DatasetManifest(name="cycle").write(raw)
    ids = [f"b{i}" for i in range(len(CYCLE_TEXTS))] + list(CYCLE_EXTRA)
    pd.DataFrame({"behavior_id": ids, "description": CYCLE_TEXTS + list(CYCLE_EXTRA.values())}).to_csv(raw / "behaviors.csv", index=False)
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        start, n = int(rng.integers(6)), int(rng.integers(6, 14))
        rows += [(f"u{u:02d}", str(1_700_000_000 + 3600 * t), f"b{(start + t) % 6}") for t in range(n)]
    pd.DataFrame(rows, columns=["user_id", "timestamp", "behavior_id"]).to_csv(raw / "events.csv", index=False)
    validate_dataset(raw, root / "clean", progress=False)
    build_sequence_dataset(root / "clean", root / "seq")
    return SequenceDataset.load(root / "seq")
