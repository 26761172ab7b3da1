"""Sorna manager and API gateway."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sorna-server")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"
