"""A live notifications feed with FastAPI, across the workers of ``uvicorn --workers N``.

Run it from the repository root::

    channels-broker -- uvicorn examples.fastapi_feed.app:app --workers 4

See :mod:`examples.fastapi_feed.app`.
"""
