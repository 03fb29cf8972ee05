"""`python -m mec_quant_plugin.cli`: the same as the `mec-quant` console script."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
