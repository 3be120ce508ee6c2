"""The one exception hierarchy of quantfw.

Expected failures (bad recipe, bad checkpoint, missing backend) raise a subclass of
`QuantfwError`; the CLI prints its message as one line and exits 2. Anything else is a bug
and keeps its traceback.
"""


class QuantfwError(Exception):
    """Base of every error a user can cause and fix."""


class ConfigError(QuantfwError):
    """A recipe, override or declaration is invalid (names the file/key and the allowed values)."""


class LayoutError(QuantfwError):
    """A tensor does not match its declared layout (names scheme, param, step, expected and found)."""


class CheckpointError(QuantfwError):
    """A checkpoint on disk is missing, corrupt or does not conform (names file and tensor)."""


class BackendUnavailable(QuantfwError):
    """A backend's optional dependency or device is missing (says how to get it)."""


class CalibrationError(QuantfwError):
    """Calibration data cannot support what the recipe asks (names layer, expert, tokens found)."""


class OutputKeptError(CheckpointError):
    """Writing the output failed (disk full, permission...); its partial state is kept for resume."""
