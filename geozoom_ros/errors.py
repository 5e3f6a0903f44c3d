"""The package's exception family.

Errors a user can cause (a missing file, a bad parameter, a map that does not match a model) are
raised as :class:`GeoZoomError` subclasses with a one-line message that names the file or
parameter, says what is wrong and what to do. The CLI prints that line and exits non-zero;
anything else is a bug and keeps its traceback.
"""


class GeoZoomError(Exception):
    """Base class of all user-facing errors."""


class InputError(GeoZoomError):
    """A file or argument given by the user is missing, unreadable or invalid."""


class TileStoreError(GeoZoomError):
    """A tile pyramid (MBTiles / XYZ directory) is missing, corrupt or unsupported."""


class ConfigError(GeoZoomError):
    """A configuration value or parameter is invalid (unknown key, out of range, wrong type)."""


class MismatchError(GeoZoomError):
    """Two artefacts do not belong together (e.g. a map bundle built for another model)."""
