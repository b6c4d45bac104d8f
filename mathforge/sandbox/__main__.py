"""`python -m mathforge.sandbox [flags]`: the same as `mathforge sandbox [flags]`."""

import sys

from mathforge.sandbox.cli import main

sys.exit(main())
