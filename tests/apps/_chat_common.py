"""What both chat apps share: the recording subscription and the publish call.

Each process that imports this module subscribes one channel to ``chat.*``; its handler
appends every message it receives as one JSON line ``{"pid", "n", "sender"}`` to
``$MPCH_OUT_DIR/<pid>.jsonl``. The pid is read when the message is handled, not at
import: under ``gunicorn --preload`` this module is imported in the master, before fork.
"""

from __future__ import annotations

import json
import os

from channels import Channel

OUT_DIR = os.environ['MPCH_OUT_DIR']
TOPIC = 'chat.room'


def on_message(message) -> None:
    data = message.data
    pid = os.getpid()
    line = json.dumps({'pid': pid, 'n': data.get('n'), 'sender': data.get('sender')})
    with open(os.path.join(OUT_DIR, f'{pid}.jsonl'), 'a', encoding='utf-8') as out:
        out.write(line + '\n')
        out.flush()


def publish(n: int) -> int:
    """Send message *n* to the room from this process; return its pid."""
    pid = os.getpid()
    Channel(TOPIC).send({'n': n, 'sender': pid})
    return pid


CHANNEL = Channel('chat.*', on_message)
