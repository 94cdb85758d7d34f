"""Moved to `gts_lum.sequence.candidates` (the split's target subset is a sequence-layer concern); this name
stays importable for serving/export.py, edited in parallel, until it imports from there."""

from gts_lum.sequence.candidates import select_candidates  # noqa: F401 (re-exported)
