"""Validation of every path piece that comes from a user, a config file or a Hub repo, before it is used.

A `subfolder` such as `../../..` or `/etc` would otherwise read (or, for `pull`, copy out) files outside the
artefact: the Hugging Face home with its stored token, for instance. Ids are matched whole (`re.fullmatch`), so a
trailing newline is refused too.
"""

from __future__ import annotations

import re
import unicodedata


PREFERENCE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_SEGMENT = re.compile(r"[A-Za-z0-9_.\-][A-Za-z0-9_.\- ]*")


def validate_preference_id(preference_id: object) -> str:
    """`preference_id` if it is 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit."""
    if not isinstance(preference_id, str) or not PREFERENCE_ID_PATTERN.fullmatch(preference_id):
        raise ValueError(
            f"Invalid preference id {preference_id!r}: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit."
        )
    return preference_id


def validate_relative_path(value: object, what: str = "subfolder") -> str:
    """`value` normalised (`a/b`) if it is a relative path that stays inside its root; a `ValueError` otherwise.

    Refused: absolute paths (`/etc`, `C:\\x`, `\\\\server`), any `..` or empty segment, backslashes, control or other
    non-printable characters, and segments with characters outside letters, digits, ' ', '_', '-' and '.'.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"Invalid {what} {value!r}: expected a non-empty relative path such as 'alice'.")
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise ValueError(f"Invalid {what} {value!r}: it contains control characters.")
    if "\\" in value or value.startswith("/") or re.match(r"[A-Za-z]:", value):
        raise ValueError(f"Invalid {what} {value!r}: it must be a relative path inside the repo or folder.")
    segments = value.strip("/").split("/") if value.endswith("/") else value.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"Invalid {what} {value!r}: segment {segment!r} is not allowed (no '..', '.', empty segments or "
                "special characters)."
            )
    return "/".join(segments)


__all__ = ["PREFERENCE_ID_PATTERN", "validate_preference_id", "validate_relative_path"]
