#!/usr/bin/env python3
"""FocuSFT training on Megatron-Core (launch with torchrun; see examples/run_focusft_qwen7b.sh).

    torchrun --nproc-per-node 8 tools/train.py --pretrained-checkpoint ckpt/qwen7b --data-path data/train \\
        --tensor-model-parallel-size 2 --sequence-parallel --global-batch-size 32 --epochs 5 --lr 1e-5 \\
        --bilevel --attention-mask glm --save runs/qwen7b --load runs/qwen7b --bf16

``python tools/train.py --help`` lists every flag; ``--config FILE.yaml`` takes the same names as keys.
"""

import sys

from megatron_focusft.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
