"""A small chat over Server-Sent Events, across the workers of ``uvicorn --workers N``.

Run it from the repository root::

    channels-broker -- uvicorn examples.chat.app:app --workers 4

See :mod:`examples.chat.app`.
"""
