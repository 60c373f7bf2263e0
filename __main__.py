"""`python -m sortline`: the sortline command."""

import sys

from sortline.cli import main

sys.exit(main())
