"""GTS-LUM: a large user-behaviour model for telecom operators (encoder - Q-former - target-aware LLM decoder)."""

__version__ = "0.1.0"
