"""python -m ringpatch.evaluate (under torchrun): every rank of the launch is one ring."""

import sys

from ringpatch.parallel import leave
from ringpatch.train.extras import check

if problem := check("eval"):
    print(problem, file=sys.stderr)
    sys.exit(2)

from ringpatch.evaluate.command import main  # noqa: E402

leave(main())  # a complete run: no interpreter finalization (ringpatch.parallel.leave)
