"""The version of dpokit, in the one place the package and its metadata read it from."""

__version__ = "0.1.0"
