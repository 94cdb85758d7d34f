"""Feature services: the named feature sets that serving and training read."""

from feast import FeatureService
from feature_views import behavior_catalog, user_profile, user_sequence

# What the KServe scorer reads per request (through gts_lum.serving.features.FeatureClient).
user_history = FeatureService(
    name="user_history",
    features=[user_sequence],
    description="A user's last N behaviours, timestamps and time IDs.",
)

user_profile_service = FeatureService(
    name="user_profile_service",
    features=[user_profile],
    description="A user's profile attributes.",
)

# Training sets: get_historical_features(features=user_training, entity_df=...) joins both point in time.
user_training = FeatureService(
    name="user_training",
    features=[user_sequence, user_profile],
    description="Sequence and profile of a user as of each entity row's timestamp.",
)

behavior_semantic_ids = FeatureService(
    name="behavior_semantic_ids",
    features=[behavior_catalog],
    description="Semantic ID, description and type of behaviours, with the semantic-ids version.",
)
