"""The watchdog that bounds each command of the bridge's engines (channels.engine)."""

from __future__ import annotations

import asyncio

import pytest

from channels.engine import Watchdog


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 5))


def test_a_block_past_its_limit_raises_timeout_error_and_leaves_the_task_uncancelled():
    async def main():
        watchdog = Watchdog(0.05)
        with pytest.raises(TimeoutError, match='0.05s'):
            with watchdog:
                await asyncio.sleep(1)
        assert asyncio.current_task().cancelling() == 0
        await asyncio.sleep(0.01)            # the task goes on as usual
        watchdog.close()
    run(main())


def test_blocks_within_their_limit_are_not_cancelled_however_many_follow_each_other():
    async def main():
        watchdog = Watchdog(0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < 0.2:      # four limits' worth of short blocks
            with watchdog:
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)                # idle past the limit: nothing fires
        assert asyncio.current_task().cancelling() == 0
        watchdog.close()
    run(main())


def test_a_cancel_from_outside_stays_a_cancel():
    async def blocked(watchdog: Watchdog):
        with watchdog:
            await asyncio.sleep(1)

    async def main():
        watchdog = Watchdog(0.5)
        task = asyncio.create_task(blocked(watchdog))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        watchdog.close()
    run(main())
