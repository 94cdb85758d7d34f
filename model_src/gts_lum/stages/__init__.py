"""Stages: what one pipeline step or one `gts-lum` command does (train, phase I, labels, promote, evaluate
a saved model, the benches), over the library below. components/ and cli.py call these; nothing in the
library imports them."""
