"""Latency, FLOPs (and later energy and accuracy) measured on the real model."""
from .flops import count_flops, flop_ratio
from .latency import LatencyStats, interleaved

__all__ = ["count_flops", "flop_ratio", "LatencyStats", "interleaved"]
