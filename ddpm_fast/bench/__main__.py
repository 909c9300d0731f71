"""``python -m ddpm_fast.bench``: the same command as ``ddpm-fast bench``."""

import sys

from . import main

sys.exit(main())
