"""cxr-edge: chest X-ray findings at the edge (runtime; never imports torch)."""

__version__ = "0.1.0"
