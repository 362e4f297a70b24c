"""python -m ringpatch.evaluate (under torchrun): every rank of the launch is one ring."""

import sys

from ringpatch.evaluate.command import main

sys.exit(main())
