"""Evaluation from cached outputs: metrics, sweeps, tables and plots."""
