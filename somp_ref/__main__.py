"""``python -m somp_ref`` is the ``somp-ref`` command."""

import sys

from somp_ref.cli import main

sys.exit(main())
