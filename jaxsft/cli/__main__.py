"""`python -m jaxsft.cli`: the `jaxsft` command."""

import sys

from jaxsft.cli import main

sys.exit(main())
