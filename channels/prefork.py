"""Is this process a worker of a pre-forking server? (For the warning of the embedded mode.)

Without a broker every process has channels of its own, which is right for one process
and wrong for the workers of gunicorn, uWSGI or ``uvicorn --workers``: a message then
reaches only the worker that sent it. :func:`prefork_server` tells such a worker from
the signs those servers really leave (read in their sources):

* gunicorn's arbiter sets ``SERVER_SOFTWARE=gunicorn/<version>`` in ``os.environ``
  before it loads the app or forks, so its workers (and a ``--preload`` master)
  inherit it;
* uWSGI's embedded ``uwsgi`` module is importable only inside uWSGI; ``uwsgi.numproc``
  is its number of workers;
* ``uvicorn --workers N`` starts each worker with multiprocessing's spawn, from
  ``uvicorn._subprocess``; its parent's command line names uvicorn (``--reload`` also
  runs one such child, which is alone and not warned about);
* otherwise the parent process (``psutil``) is a gunicorn, uvicorn or uwsgi master by
  its name or command line (``gunicorn: master [...]`` with setproctitle).

It is called once per process, at the first start without a broker.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

import psutil

__all__ = ['prefork_server']

_SERVERS = ('gunicorn', 'uvicorn', 'uwsgi')


def prefork_server() -> str | None:
    """A description of the pre-forking server this process works for, or None."""
    software = os.environ.get('SERVER_SOFTWARE', '')
    if software.startswith('gunicorn/'):
        return software
    uwsgi = _uwsgi_module()
    if uwsgi is not None and getattr(uwsgi, 'numproc', 0) > 1:
        return f'uWSGI ({uwsgi.numproc} workers)'
    parent = _parent_server()
    if parent is not None:
        return parent
    if 'uvicorn._subprocess' in sys.modules and multiprocessing.parent_process() is not None:
        return 'uvicorn (a worker it spawned)'
    return None


def _uwsgi_module():
    if 'uwsgi' in sys.modules:
        return sys.modules['uwsgi']
    if 'uwsgi' not in sys.builtin_module_names:     # uWSGI builds it into its interpreter
        return None
    try:
        import uwsgi
    except ImportError:
        return None
    return uwsgi


def _parent_server() -> str | None:
    """'<server> (master pid N)' if the parent process is a server's master."""
    try:
        parent = psutil.Process().parent()
        if parent is None:
            return None
        words = [parent.name(), *parent.cmdline()[:3]]
    except psutil.Error:
        return None
    # the script's name ('/venv/bin/gunicorn'), a process title ('gunicorn: master
    # [app]'), or 'python -m uvicorn'
    names = [os.path.basename(word.split(':', 1)[0].split(' ', 1)[0]) for word in words]
    if words[2:3] == ['-m']:
        names.append(words[3] if len(words) > 3 else '')
    server = next((name for name in names if name in _SERVERS), None)
    if server is None:
        return None
    try:
        if server == 'uvicorn' and '--reload' in parent.cmdline():
            return None          # its one child under the reloader: a single process
    except psutil.Error:
        return None
    return f'{server} (master pid {parent.pid})'
