"""User-facing errors: one clear line, no traceback, from the command line."""
from __future__ import annotations


class DmdeError(Exception):
    """An error caused by the user's input or environment (bad WNID, missing data, ...).

    The command line prints ``dmde: error: <message>`` on stderr and exits with status 2.
    Library callers catch it like any exception. Subclasses also derive from the matching
    builtin (ValueError, FileNotFoundError) so generic handlers keep working.
    """


class DmdeValueError(DmdeError, ValueError):
    """Bad value: malformed WNID, λ out of range, K > N, ..."""


class DmdeFileError(DmdeError, FileNotFoundError):
    """A file or directory that must exist does not, or cannot be read."""


class WordNetNotFoundError(DmdeFileError):
    """WordNet 3.0's database files could not be located."""


class CorruptImageError(DmdeError, OSError):
    """An image file that Pillow cannot decode."""


class MismatchError(DmdeError, ValueError):
    """Two artefacts that must agree do not (groups vs. ontology, checkpoint vs. group, ...)."""
