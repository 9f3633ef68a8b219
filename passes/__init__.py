"""Acceleration passes, one module per pass. They operate on captured graphs and never name a model."""
