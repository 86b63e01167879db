"""``python -m ident.doctor``: the same as ``ident doctor``."""

import sys

from ident.doctor.cli import main

if __name__ == "__main__":
    sys.exit(main())
