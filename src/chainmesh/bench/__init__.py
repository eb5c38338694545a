"""``chainmesh bench``: side-by-side benchmarks of chainmesh and its peers.

Loaded only by the ``chainmesh bench`` command and the benchmark tests:
``import chainmesh`` and ``chainmesh demo`` never import this package.

Modules: ``runner`` (the command: a fresh process per measurement), ``worker``
(one measurement), ``models`` (benchmark models, raw gradient rate), ``host``
(machine facts, waiting for a quiet machine), ``report`` (tables and plots),
``peers`` and ``nutpie_peer`` (BlackJAX and nutpie on a NumPyro potential).

``chainmesh bench --suite``: ``suite`` (the command), ``suite_worker`` (one
run), ``suite_report`` (``suite.md``, ``suite.png``), ``targets`` (posteriors
and configurations), ``posteriors`` (the posteriordb models; their data and
references in ``posteriordb/``).
"""
