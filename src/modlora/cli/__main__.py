"""``python -m modlora.cli``."""

import sys

from modlora.cli import main

sys.exit(main())
