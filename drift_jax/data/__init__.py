"""Data: rollout records, chat rendering, SFT batches, and question sources.

Nothing here imports JAX or the model: reading or validating a rollout file stays light.
"""
