"""The batch-scoring pipeline through kfp.local on an export that lives in a bucket (a real S3 server on
127.0.0.1): imported by its minio:// URI, as the KFP launcher imports it on a cluster."""

from __future__ import annotations

import pandas as pd
import pytest

from gts_lum.data import storage
from pipelines.run_local import run


# kfp.local warns that a remote artifact has no local path: the step downloads it (components/serving.py)
@pytest.mark.filterwarnings("ignore:It looks like you're using the remote file:UserWarning")
def test_batch_scoring_reads_the_export_from_object_storage(tiny_serving, s3_bucket, tmp_path):
    uri = storage.upload(tiny_serving.export, f"minio://{s3_bucket}/v2/artifacts/gts-lum-training/run-1/export-model/export")
    storage.upload(tiny_serving.clean.parent / "raw", f"s3://{s3_bucket}/operators/tiny")  # the data from a bucket too
    run_dir = run(
        "batch_scoring",
        tmp_path,
        {"export_uri": uri, "data_source": f"s3://{s3_bucket}/operators/tiny", "users": "U000000,U000001", "top_k": 3},
    )
    scores = pd.concat(pd.read_parquet(p) for p in sorted((run_dir / "batch-score" / "scores").glob("part-*.parquet")))
    assert sorted(scores["user_id"].unique()) == ["U000000", "U000001"]
