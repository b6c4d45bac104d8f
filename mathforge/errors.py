"""Errors that reach the user as one clear line (what was wrong, what to do), never a traceback."""


class UserError(Exception):
    """Bad input or a missing prerequisite the user can fix."""
