"""megatron_focusft: FocuSFT bilevel long-context SFT on Megatron-Core."""

__version__ = "0.1.0"
