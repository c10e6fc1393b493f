"""Profilers: analytic FLOPs, measured op counts, latency, memory and energy."""
