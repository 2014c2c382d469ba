"""``python -m qpass.cli COMMAND ...``: the same as the ``qpass`` console script."""
import sys

from . import main

sys.exit(main())
