"""labkit: a namespace-only test lab for nfs-ha (stdlib only).

    import sys; sys.path.insert(0, "<repo>/compose")
    from labkit import Lab
    lab = Lab(); lab.up(); ...; lab.down()
"""

from .errors import CommandError, LabError
from .lab import Lab

__all__ = ["CommandError", "Lab", "LabError"]
