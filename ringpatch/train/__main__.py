"""python -m ringpatch.train --recipe ... (under torchrun, deepspeed or accelerate launch)."""

import sys

from ringpatch.train.extras import check

if problem := check("train"):
    print(problem, file=sys.stderr)
    sys.exit(2)

from ringpatch.train.command import main  # noqa: E402

sys.exit(main())
