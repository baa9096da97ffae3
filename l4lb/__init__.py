"""l4lb: a userspace L4 load balancer with a Cython splice data plane."""

from l4lb._version import __version__

__all__ = ["__version__"]
