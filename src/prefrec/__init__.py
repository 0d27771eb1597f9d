"""prefrec: turn a causal language model into a personalised recommender."""

__version__ = "0.1.0"
