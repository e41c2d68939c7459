"""``python -m benchmarks [dispatch|amqp|worker|steady-sweep|scale|policies|idle-sweep] [ARGS]``:
see the package docstring.

Without a first word the first six run, dispatch first (``ARGS`` go to the dispatch
benchmark); ``idle-sweep`` is a measurement to run by name.
"""

import sys

from benchmarks import amqp, dispatch, idle_sweep, policies, scale, steady_sweep, worker

arguments = sys.argv[1:]
if arguments[:1] == ["dispatch"]:
    sys.exit(dispatch.main(arguments[1:]))
if arguments[:1] == ["amqp"]:
    sys.exit(amqp.main(arguments[1:]))
if arguments[:1] == ["worker"]:
    sys.exit(worker.main(arguments[1:]))
if arguments[:1] == ["steady-sweep"]:
    sys.exit(steady_sweep.main(arguments[1:]))
if arguments[:1] == ["scale"]:
    sys.exit(scale.main(arguments[1:]))
if arguments[:1] == ["policies"]:
    sys.exit(policies.main(arguments[1:]))
if arguments[:1] == ["idle-sweep"]:
    sys.exit(idle_sweep.main(arguments[1:]))
sys.exit(
    dispatch.main(arguments)
    or amqp.main([])
    or worker.main([])
    or steady_sweep.main([])
    or scale.main([])
    or policies.main([])
)
