"""User-facing errors: the CLI prints ``str(err)`` as one line and exits non-zero."""


class LLMFlashError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class FlashFileError(LLMFlashError):
    """A flash directory is missing, corrupt, or belongs to another model."""


class BudgetError(LLMFlashError):
    """The DRAM budget cannot hold what the engine needs."""
