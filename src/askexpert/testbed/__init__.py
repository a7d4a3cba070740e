"""The testbed: per-sample latency and energy of each strategy, and budget-driven calibration."""
