"""megatron_focusft: FocuSFT bilevel long-context SFT on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Megatron-Core warns at import, from five modules, that TransformerEngine / Apex are missing and that it
# uses its torch fallbacks.  That is the expected state on CPU, and what we need from TE we check and report
# ourselves (``attention.te``), so the warnings only bury the tools' output.
warnings.filterwarnings(
    "ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed\. Falling back", category=UserWarning
)
# megatron-core 0.16's own default ``cuda_graph_scope="full"`` warns that it is deprecated in every
# TransformerConfig; we use no CUDA graphs.
warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
