"""``python -m benchmarks``: see the package docstring."""

import sys

from benchmarks import dispatch

sys.exit(dispatch.main())
