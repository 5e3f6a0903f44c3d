"""Atomic file writes: a reader never sees a half-written artefact.

Every file other processes read (models, reports, tables) is written to a temporary name in
its own folder and renamed into place, so a kill leaves either the old file or the new one.
"""

import json
import os
from pathlib import Path
import tempfile


def atomic_write(path, write):
    """Create ``path`` by calling ``write(tmp_path)`` and renaming the result into place.

    The temporary file lives in the same folder (``os.replace`` is atomic there) and gets the
    permissions a plain ``open()`` would give; it is removed if ``write`` fails. Returns the
    path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically, flushed to disk; return the path."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(path, write)


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path, obj):
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically; return the path."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')
