"""Evaluation: multi@k and correction rates, probes of a trained policy, sweeps, the report."""
