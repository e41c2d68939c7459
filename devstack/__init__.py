"""A throwaway local stack of real servers for tests and the demo.

This machine has no Docker engine, so there is no kind or k3d: devstack starts etcd,
kube-apiserver (and kube-controller-manager for garbage collection), PostgreSQL and Redis
as plain processes on free loopback ports in a temporary directory, and stops them by PID.
The same code serves the pytest fixtures, ``make stack-up`` and ``make demo``.
"""
