"""``python -m prefrec`` (used by ``accelerate launch -m prefrec``)."""

import sys

from prefrec.cli import main

sys.exit(main())
