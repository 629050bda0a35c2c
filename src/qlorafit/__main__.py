"""`python -m qlorafit ...`: the command line (also how torchrun and the allocator restart launch it)."""

import sys

from .cli import main

sys.exit(main())
