"""The parts of ``scripts/bench.py``, one job each (that script is the command).

* ``cases``: the sizes of the runs (``FULL``, ``QUICK``), the cases and the systems;
* ``local``: the in-process cases, this project's ``channels`` and Lona's;
* ``ours``, ``queue_relay``, ``zeromq``: each system's processes across processes, with
  their measured loops inline;
* ``ours_bridged``, ``socketio_redis``, ``broadcaster_stream``, ``nats_core``: each
  system's processes across machines (ours: a broker per machine, bridged), with their
  measured loops inline;
* ``socketio_servers`` (with ``sio_app``, the server, and ``sio_clients``, the clients):
  python-socketio across four uvicorn workers, ours against its ``AsyncRedisManager``;
  ``socketio_report``, its table;
* ``fanout``: many consumers of one topic in one process, ours (``listen()``, coroutine
  and plain handlers) and the fan-out written by hand, with their measured loops inline;
* ``engines``: the run's own ``redis-server`` or ``nats-server -js``, always stopped (the
  tests' ``tests/engines.py`` builds on it);
* ``cross``: the cross-process and bridged cases of any system (the clock, the checks);
* ``procs``: starting, talking to and always stopping the processes;
* ``stats``: medians over runs, percentiles, CPU time per message;
* ``report``: the tables (text or Markdown), their notes, and the picture;
* ``bridged_report``: the table across machines and its notes;
* ``fanout_report``: the fan-out table, its notes and its picture's figures.

``scripts/`` is no package: ``bench.py`` puts it on ``sys.path`` (running it does
anyway) and imports this package as ``benchmarks``.
"""
