"""The project's exception types.  The CLI turns any ``MagicStyleError`` into one line on stderr and exit status 2."""


class MagicStyleError(Exception):
    """A problem with the user's input (file, option, configuration), with a message that says what to do."""


class CheckpointError(MagicStyleError):
    """A weights file that cannot be used: missing, not safetensors, the wrong model, or a tensor that does not fit."""
