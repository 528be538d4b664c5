"""Measurement on the real model: latency (interleaved), energy (hardware counters), accuracy (the
same images for every model), and the reports (JSON, Markdown, PNG) people paste into reviews."""
from .latency import LatencyStats, interleaved

__all__ = ["LatencyStats", "interleaved"]
