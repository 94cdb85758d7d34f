"""Where the feature store reads its data: parquet files written by `gts-lum features export`.

The folder comes from the environment variable GTS_LUM_FEATURE_DATA (default: data/sources/ in this
repo) because Feast records a source's path in the registry when the repo is applied: the pipeline
exports into a run's artifact folder, production into shared storage, tests into a temporary folder,
so no fixed path can live in the definitions.
"""

import os
from pathlib import Path

from feast import FileSource, PushSource

DATA = os.environ.get("GTS_LUM_FEATURE_DATA") or str(Path(__file__).resolve().parent / "data" / "sources")

user_profile_source = FileSource(
    name="user_profile_source",
    path=f"{DATA}/user_profile.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="The users table (profile attributes), valid from the first event of the exported data window.",
)

user_sequence_source = FileSource(
    name="user_sequence_source",
    path=f"{DATA}/user_sequence.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="Snapshots of each user's last N events, one per local day with events (point-in-time joins).",
)

# Serving appends events through this source (FeatureClient.push_events); the file above backs it.
user_sequence_push = PushSource(name="user_sequence_push", batch_source=user_sequence_source)

behavior_catalog_source = FileSource(
    name="behavior_catalog_source",
    path=f"{DATA}/behavior_catalog.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="The behaviours table with the semantic ID of each behaviour and the semantic-ids version.",
)

sequence_settings_source = FileSource(
    name="sequence_settings_source",
    path=f"{DATA}/sequence_settings.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created",
    description="One row: the timestamp-process settings and N of the exported sequences.",
)
