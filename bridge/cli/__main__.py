"""``python -m bridge.cli``: the ``fhirbridge`` console script."""

import sys

from bridge.cli import main

sys.exit(main())
