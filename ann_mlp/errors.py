"""Typed errors of the library; the CLI and the server map them to messages once."""


class AnnMlpError(Exception):
    """Base class: a problem the user can fix, reported as one line."""


class CheckpointError(AnnMlpError):
    """The checkpoint is missing, unsupported, pickled, or not the one a store was built from."""


class BackendError(AnnMlpError):
    """A backend or its parameters are invalid."""


class StoreError(AnnMlpError):
    """An index store is missing, incomplete, corrupted, or cannot be written."""


class InputError(AnnMlpError):
    """User input (text, k, recall target, ...) is out of range or empty."""


class DeadlineError(AnnMlpError):
    """Work stopped because its caller's deadline passed."""
