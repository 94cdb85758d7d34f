"""Entities of the gts-lum feature store.

Users are keyed by a pseudonym, never by the operator's subscriber id: `user_pseudonym` is the
HMAC-SHA256 of the id under a key held only in the environment (gts_lum.serving.features.pseudonymize),
so neither store nor registry holds a raw id and deleting the key unlinks every stored row.
"""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_pseudonym"],
    value_type=ValueType.STRING,
    description="A subscriber, keyed by the HMAC-SHA256 pseudonym of the operator's user id.",
)

behavior = Entity(
    name="behavior",
    join_keys=["behavior_id"],
    value_type=ValueType.STRING,
    description="A behaviour of the operator's catalog (the data contract's behaviours table).",
)

settings = Entity(
    name="feature_dataset",
    join_keys=["settings_key"],
    value_type=ValueType.STRING,
    description="The published data set; its one key, 'current', holds the settings its features follow.",
)
