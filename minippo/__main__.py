"""`python -m minippo ...` is the same as the `minippo` command."""

import sys

from minippo.app.cli import main

sys.exit(main())
