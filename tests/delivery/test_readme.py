"""README's "First run on a cluster": every step says whether tests run it or it needs a live cluster,
and the tests it cites exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_first_run_step_is_tested_or_marked_live():
    text = (REPO / "README.md").read_text()
    section = text.split("## First run on a cluster", 1)[1].split("\n## ", 1)[0]
    steps = re.split(r"\n(?=\d+\. \*\*)", section)[1:]
    assert len(steps) >= 7, "images, manifests, secrets, data, pipeline, deploy, score"
    for step in steps:
        assert re.search(r"\[(tests|live)\]", step), f"step {step.splitlines()[0]!r}: mark it [tests] or [live]"
    for cited in re.findall(r"`(tests/[\w/]+\.py)`", section):
        assert (REPO / cited).exists(), f"README cites {cited}, which does not exist"
