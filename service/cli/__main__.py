"""``python -m service.cli``: the same as ``efficientnet-batch``."""

import sys

from service.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
