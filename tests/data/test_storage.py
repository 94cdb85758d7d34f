"""Object-store URIs against a real S3 server on 127.0.0.1 (moto's server mode): folders and files in and
out, KFP's minio:// as the same bucket, ingest straight from a bucket, and errors that name the URI."""

from __future__ import annotations

import pytest

from gts_lum.data import storage
from gts_lum.data.ingest import bring_in, prepare_dataset


def test_uri_kinds():
    assert storage.is_remote("s3://b/k") and storage.is_remote("minio://b/k") and storage.is_remote("gs://b/k")
    for local in ("runs/x", "/tmp/x", "pvc-mount/s3://x", "synth:tiny"):
        assert not storage.is_remote(local)
    assert storage.canonical("minio://mlpipeline/v2/x") == "s3://mlpipeline/v2/x"
    assert storage.canonical("gs://b/x") == "gs://b/x" and storage.canonical("runs/x") == "runs/x"
    with pytest.raises(ValueError, match="s3:///key: no bucket"):
        storage.filesystem("s3:///key")


def test_folders_and_files_round_trip(s3_bucket, tmp_path):
    src = tmp_path / "src"
    (src / "events").mkdir(parents=True)
    (src / "events" / "part-0.csv").write_text("a,b\n1,2\n")
    (src / "behaviors.csv").write_text("behavior_id\nx\n")
    storage.upload(src, f"s3://{s3_bucket}/data/set")
    # minio:// names the same bucket (KFP's MinIO is an S3 API): read it back under that name
    back = storage.download(f"minio://{s3_bucket}/data/set", tmp_path / "back")
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == ["behaviors.csv", "events/part-0.csv"]
    assert (back / "events" / "part-0.csv").read_text() == "a,b\n1,2\n"
    one = storage.download(f"s3://{s3_bucket}/data/set/behaviors.csv", tmp_path / "one")
    assert (one / "behaviors.csv").read_text() == "behavior_id\nx\n"

    assert storage.read_bytes(f"s3://{s3_bucket}/state/registry.json") is None
    storage.write_bytes(f"s3://{s3_bucket}/state/registry.json", b"{}")
    assert storage.read_bytes(f"s3://{s3_bucket}/state/registry.json") == b"{}" and storage.exists(f"s3://{s3_bucket}/state")
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/nothing/here: nothing there"):
        storage.download(f"s3://{s3_bucket}/nothing/here", tmp_path / "none")


def test_ingest_reads_a_data_set_from_a_bucket(s3_bucket, tmp_path):
    local = (
        prepare_dataset("synth:tiny", tmp_path / "made", progress=False).parent / "raw"
    )  # the contract layout, as an operator uploads it
    storage.upload(local, f"s3://{s3_bucket}/operators/tiny")
    raw = bring_in(f"s3://{s3_bucket}/operators/tiny", tmp_path / "raw", progress=False)
    assert raw == tmp_path / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.name for p in local.iterdir())
    clean = prepare_dataset(f"minio://{s3_bucket}/operators/tiny", tmp_path / "work", progress=False)
    assert storage.exists(str(clean / "validation_summary.json"))
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/operators/absent"):
        bring_in(f"s3://{s3_bucket}/operators/absent", tmp_path / "raw2", progress=False)
    storage.write_bytes(f"s3://{s3_bucket}/operators/own/cdr.csv", b"msisdn,when\n1,2\n")
    with pytest.raises(ValueError, match=f"s3://{s3_bucket}/operators/own is not in the contract layout"):
        bring_in(f"s3://{s3_bucket}/operators/own", tmp_path / "raw3", progress=False)


def test_an_unreachable_store_is_named(monkeypatch, tmp_path):
    from tests.conftest import loopback_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{loopback_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(OSError, match="s3://bucket/data: cannot reach the object store"):
        storage.download("s3://bucket/data", tmp_path)
