"""Names shared by the synthetic generator's modules: deterministic tokens and the map PNG names."""

from __future__ import annotations

import hashlib

# The semantic-prior PNG names of the real maps (the devkit's map_expansion/bitmap.py looks them up by name).
MAP_PNG = {
    "singapore-onenorth": "53992ee3023e5494b90c316c183be829.png",
    "singapore-hollandvillage": "37819e65e09e5547b8a3ceaefba56bb2.png",
    "singapore-queenstown": "93406b464a165eaba6d9de76ca09f5da.png",
    "boston-seaport": "36092f0b03a857c6a3403e25b4b7aab3.png",
}


def token(*parts) -> str:
    """A deterministic 32-hex token."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()
