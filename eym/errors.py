"""The one exception type users see.

Library code raises :class:`EymError` for anything a user can fix (bad file, bad setting,
missing weights). Its message is one line that names the offending value and says what to do.
The CLI prints it as ``error: ...`` (exit code 2) and the app shows it with ``gr.Error``.
"""


class EymError(ValueError):
    """A problem with the user's input or environment, with a message that says what to do."""
