"""Measurement: device and link profiles, energy meters and models, link emulation, a load client for benchmarks."""
