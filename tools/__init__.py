"""Tooling outside the domain core: process launch, sweeps, benchmarks (not in the wheel)."""
