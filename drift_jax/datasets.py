"""The former name of ``drift_jax.questions``, kept for existing code; use that module."""

from drift_jax.questions import LAYOUTS, DatasetError, LoadedQuestions, detect_layout, load_questions

__all__ = ["LAYOUTS", "DatasetError", "LoadedQuestions", "detect_layout", "load_questions"]
