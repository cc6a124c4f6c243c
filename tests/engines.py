"""Real Redis and NATS JetStream servers for the bridge tests: own ports, own data
directories, killed and restarted at will, always stopped.

Starting and stopping them is the benchmark's (``scripts/benchmarks/engines.py``, on the
path through ``pythonpath`` in ``pyproject.toml``); this adds what the tests do to them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from benchmarks.engines import Engine, free_port

__all__ = ['EngineServer', 'free_port']


class EngineServer(Engine):
    """One redis-server or nats-server process, with its data in a directory of its own.

    ``start()`` waits until it accepts connections; ``kill()`` SIGKILLs it;
    ``restart()`` starts it again on the same port and data (``persist=False`` wipes
    the data first, as a server without persistence comes back empty);
    ``pause()``/``resume()`` SIGSTOP/SIGCONT it (a half-open connection).
    """

    DATA_PREFIX = 'mpch-'

    def kill(self) -> None:
        """SIGKILL, and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self, *, persist: bool | None = None) -> None:
        """Kill it and start it again on the same port; without persistence it comes
        back empty."""
        self.kill()
        if persist is False or (persist is None and not self.persist):
            for name in os.listdir(self.data):
                if name != 'server.log':
                    path = os.path.join(self.data, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (half-open)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self.process.send_signal(signal.SIGCONT)

    def redis_cli(self, *args: str) -> str:
        """Run a redis-cli command against this server (Redis only)."""
        command = ['redis-cli', '-p', str(self.port)]
        if self.password:
            command += ['-a', self.password, '--no-auth-warning']
        return subprocess.run(command + list(args), capture_output=True, text=True,
                              timeout=10, check=True).stdout
