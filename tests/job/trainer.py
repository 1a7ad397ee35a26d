"""A small deterministic CPU training job that uses the SDK as a user would.

Case 17's setup: 20 samples, batch 4 (5 steps per epoch), 3 epochs, shuffle,
an MLP with dropout p=0.1, seed 1234. It prints ``step=N loss=HEX`` per step,
with the loss as ``float.hex()`` so that runs compare bit for bit. Checkpoint
location and resume point come from the GPUFLEET_* environment. The script
lives in the package (``gpufleet.demo.train_mlp``) so that the demo runs it
from an installed gpufleet; this file keeps the tests' path to it.

    python tests/job/trainer.py [--steps 15] [--kill-after N] [--save-at N]
"""

from __future__ import annotations

import sys

from gpufleet.demo.train_mlp import main

if __name__ == "__main__":
    sys.exit(main())
