"""The one exception type for bad input: its message names the fix."""


class PruneError(ValueError):
    """Bad input (model, task, data, budget). The message is one line that says what to do."""
