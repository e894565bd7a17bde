"""Entry point of ``python -m sidecar.docs`` (see `sidecar.docs.command`)."""

import sys

from sidecar.docs.command import main

sys.exit(main())
