"""python -m ringpatch.evaluate (under torchrun): every rank of the launch is one ring."""

from ringpatch.parallel import leave
from ringpatch.train.extras import require

require("eval")

from ringpatch.evaluate.command import main  # noqa: E402

leave(main())  # a complete run: no interpreter finalization (ringpatch.parallel.leave)
