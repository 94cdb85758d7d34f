"""Kubeflow Pipelines components: one lightweight component per containerized step.

Each component is a thin wrapper: it imports `gts_lum` inside its body and calls one function of it, so
the same component runs under `kfp.local` (SubprocessRunner, in this virtualenv) and in the project's
image on a cluster. The image is a setting: `GTS_LUM_IMAGE` at compile time.
"""

import os

IMAGE = os.environ.get("GTS_LUM_IMAGE", "ghcr.io/gts-lum/gts-lum-python:0.1.0")
