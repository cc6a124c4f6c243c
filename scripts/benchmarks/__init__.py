"""The parts of ``scripts/bench.py``, one job each (that script is the command).

* ``cases``: the sizes of the runs (``FULL``, ``QUICK``), the cases and the systems;
* ``local``: the in-process cases, this project's ``channels`` and Lona's;
* ``ours``, ``queue_relay``, ``zeromq``: each system's processes across processes, with
  their measured loops inline;
* ``cross``: the cross-process cases of any system (the clock, the checks);
* ``procs``: starting, talking to and always stopping the processes;
* ``stats``: medians over runs, percentiles, CPU time per message;
* ``report``: the tables (text or Markdown), their notes, and the picture.

``scripts/`` is no package: ``bench.py`` puts it on ``sys.path`` (running it does
anyway) and imports this package as ``benchmarks``.
"""
