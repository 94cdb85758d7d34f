"""Feature views: user profile, user behaviour sequence (last N events), behaviour catalog.

TTLs are chosen per view, on purpose:
- user_sequence, 30 days: a last-N history not refreshed for a month says little about what the user
  does next; point-in-time joins do not reach back further than that for a snapshot.
- user_profile, 365 days: plan, device and tenure change slowly and are re-exported with every data
  window; a profile a year old is stale.
- behavior_catalog, none (0): a catalog version stays valid until a newer one replaces it.
- sequence_settings, none (0): the settings hold until the next publish replaces them.
Every schema is declared, so `feast apply` works on a fresh clone, before any data is exported.
"""

from datetime import timedelta

from data_sources import behavior_catalog_source, sequence_settings_source, user_profile_source, user_sequence_push
from entities import behavior, settings, user
from feast import FeatureView, Field
from feast.types import Array, Int32, Int64, String

# The data contract lets each data set bring its own users attribute columns (plan, device, region,
# ...): one JSON object keeps the schema fixed, so it needs no data to be declared.
user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(days=365),
    schema=[Field(name="attributes", dtype=String, description="JSON object of the users table's attribute columns")],
    source=user_profile_source,
    online=True,
    description="Profile attributes of the data contract's users table.",
)

# The last N events, oldest first, as parallel arrays: what the timestamp process
# (gts_lum.sequence.timestamp_process) turns into a token sequence. `time_ids` are the events'
# interval indices in operator local time, under the settings of the sequence_settings view.
user_sequence = FeatureView(
    name="user_sequence",
    entities=[user],
    ttl=timedelta(days=30),
    schema=[
        Field(name="behavior_ids", dtype=Array(String)),
        Field(name="timestamps", dtype=Array(Int64), description="unix seconds, UTC"),
        Field(name="time_ids", dtype=Array(Int64), description="local interval index since 1970-01-01 00:00 local"),
    ],
    source=user_sequence_push,
    online=True,
    description="The user's last N behaviours with their timestamps and time IDs.",
)

behavior_catalog = FeatureView(
    name="behavior_catalog",
    entities=[behavior],
    ttl=timedelta(0),
    schema=[
        Field(name="description", dtype=String),
        Field(name="type", dtype=String),
        Field(name="semantic_id", dtype=String, description="codes joined by '-', e.g. 3-0-5-1"),
        Field(name="semantic_codes", dtype=Array(Int32)),
        Field(name="semantic_ids_version", dtype=String, description="content hash of the semantic-ids artifact"),
    ],
    source=behavior_catalog_source,
    online=True,
    description="The behaviour catalog with semantic IDs (paper section 3.2) and their version.",
)

# What serving needs to extend the stored arrays the same way (timezone, interval, N), as data in the
# online store: a plain `feast apply` replaces definitions (and their tags) but keeps the stored rows.
sequence_settings = FeatureView(
    name="sequence_settings",
    entities=[settings],
    ttl=timedelta(0),
    schema=[
        Field(name="sequence_config", dtype=String, description="JSON of gts_lum's SequenceConfig, the data set's timezone included"),
        Field(name="last_n", dtype=Int64, description="events kept per user"),
    ],
    source=sequence_settings_source,
    online=True,
    description="The timestamp-process settings the stored time IDs follow, and N.",
)
