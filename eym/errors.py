"""The one exception type users see.

Library code raises :class:`EymError` for anything a user can fix (bad file, bad setting,
missing weights). Its message is one line that names the offending value and says what to do.
The CLI prints it as ``error: ...`` (exit code 2) and the app shows it with ``gr.Error``.
"""

import re


class EymError(ValueError):
    """A problem with the user's input or environment, with a message that says what to do."""


# An absolute path: "/" then at least one folder, never preceded by a word, "." or ":" (URLs, ratios).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"`/]+/)+([^\s'\"`/:,;)]*)")


def without_paths(message: str) -> str:
    """``message`` with every absolute path cut to its last component (for pages served to the public).

    Library messages name files by path, which helps on the command line; on a public page a
    server path (``/tmp/gradio/<hash>/clip.mp4``, the cache folder) says nothing useful to the
    user and tells an attacker the server's layout.
    """
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "folder", message)
