"""Core-attention backends plugged into the layer spec (``dense`` reference, ``flex``, ``te``)."""
