"""``python -m loramerge_client`` = the ``loramerge`` command."""

import sys

from loramerge_client.cli import main

sys.exit(main())
