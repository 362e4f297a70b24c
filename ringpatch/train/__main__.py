"""python -m ringpatch.train --recipe ... (under torchrun, deepspeed or accelerate launch)."""

import sys

from ringpatch.train.command import main

sys.exit(main())
