"""`python -m vision_gpt.cli` (and `accelerate launch -m vision_gpt.cli`): the `vision-gpt` command."""

import sys

from .commands import main

sys.exit(main())
