"""Serving: the export of a trained model, the KServe scorer, batch scoring and the Feast feature client."""
