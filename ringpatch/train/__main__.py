"""python -m ringpatch.train --recipe ... (under torchrun, deepspeed or accelerate launch)."""

import sys

from ringpatch.parallel import leave
from ringpatch.train.extras import check

if problem := check("train"):
    print(problem, file=sys.stderr)
    sys.exit(2)

from ringpatch.train.command import main  # noqa: E402

leave(main())  # a complete run: no interpreter finalization (ringpatch.parallel.leave)
