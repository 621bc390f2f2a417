"""Former name of ``drift_jax.records`` (rollout-file reading and writing), kept so
existing code and scripts keep working; new code imports ``drift_jax.records``."""

from drift_jax.records import (
    REQUIRED_FIELDS,
    ROLES,
    BadLines,
    BadRecord,
    Record,
    append_group,
    context_check,
    parse_record,
    read_jsonl,
    read_rollouts,
    resume_point,
    summarize_skipped,
    validate_record,
    write_jsonl,
)

__all__ = [
    "REQUIRED_FIELDS", "ROLES", "BadLines", "BadRecord", "Record", "append_group", "context_check",
    "parse_record", "read_jsonl", "read_rollouts", "resume_point", "summarize_skipped",
    "validate_record", "write_jsonl",
]
