"""The embedded default: DRIFT on the secret-guessing toy task, sized for a laptop CPU.

An ~80k-parameter transformer learns the task's "base model" habit (answer some
candidate, then mostly repeat it after "Incorrect") from synthetic transcripts; DRIFT
then has to teach it to use the feedback (``docs/embedded-task.md``). Every value is
``base.py``'s default.
"""

from experiments.configs import base


def get_config():
    return base.get_config()
