"""python -m ringpatch.train --recipe ... (under torchrun, deepspeed or accelerate launch)."""

from ringpatch.parallel import leave
from ringpatch.train.extras import require

require("train")

from ringpatch.train.command import main  # noqa: E402

leave(main())  # a complete run: no interpreter finalization (ringpatch.parallel.leave)
