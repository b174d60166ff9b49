"""The harness's error for bad input to a run (a config value, a file, a checkpoint)."""


class RunError(ValueError):
    """Bad input to a run. The message is one line naming the fix (often a Hydra override)."""
