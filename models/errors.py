"""The project's exception types.  The CLI turns any ``MagicStyleError`` into one line on stderr and exit status 2
(a write that fails once the work is done, ``magicstyle.output.WriteError``: status 1, the run failed)."""


class MagicStyleError(Exception):
    """A problem with the user's input (file, option, configuration), with a message that says what to do."""


class CheckpointError(MagicStyleError):
    """A weights file that cannot be used: missing, not safetensors, the wrong model, or a tensor that does not fit."""


def first_line(e: BaseException, *, typed: bool = False) -> str:
    """The first line of ``e``'s message, for a one-line error; the name of its type when the message is empty.
    ``typed``: prefixed by the type's name (``OSError: ...``) unless ``e`` is a ``MagicStyleError``, whose message
    says it all."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0].strip()
    return f"{type(e).__name__}: {line}" if typed and not isinstance(e, MagicStyleError) else line
