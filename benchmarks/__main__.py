"""``python -m benchmarks [dispatch|worker] [ARGS]``: see the package docstring.

Without a first word both run, dispatch first (``ARGS`` go to the dispatch benchmark).
"""

import sys

from benchmarks import dispatch, worker

arguments = sys.argv[1:]
if arguments[:1] == ["dispatch"]:
    sys.exit(dispatch.main(arguments[1:]))
if arguments[:1] == ["worker"]:
    sys.exit(worker.main(arguments[1:]))
sys.exit(dispatch.main(arguments) or worker.main([]))
