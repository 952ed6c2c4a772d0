"""``python -m service``: the same as ``efficientnet-serve``."""

import sys

from service.server.main import main

if __name__ == "__main__":
    sys.exit(main())
