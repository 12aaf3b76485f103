"""The admission gate: capacity, FIFO, bounded waits, and no slot lost to cancellation."""

from __future__ import annotations

import asyncio

import pytest

from service.upstreams.gate import Gate, GateTimeout
from tests.support.net import eventually


async def test_capacity_and_fifo_handover() -> None:
    gate = Gate(2)
    await gate.acquire(None)
    await gate.acquire(None)
    order: list[int] = []

    async def waiter(n: int) -> None:
        await gate.acquire(None)
        order.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert (gate.in_use, gate.waiting) == (2, 3)
    for _ in range(3):
        gate.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert (gate.in_use, gate.waiting) == (2, 0)


async def test_timeout_leaves_no_waiter() -> None:
    gate = Gate(1)
    await gate.acquire(None)
    with pytest.raises(GateTimeout):
        await gate.acquire(0.05)
    assert (gate.in_use, gate.waiting) == (1, 0)
    gate.release()
    assert gate.in_use == 0


async def test_cancelled_waiter_leaves_no_waiter() -> None:
    gate = Gate(1)
    await gate.acquire(None)
    task = asyncio.create_task(gate.acquire(None))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (gate.in_use, gate.waiting) == (1, 0)


async def test_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    """The race behind encode/httpcore#1093: the slot arrives, then the cancel does."""
    gate = Gate(1)
    await gate.acquire(None)
    first = asyncio.create_task(gate.acquire(None))
    second = asyncio.create_task(gate.acquire(None))
    await asyncio.sleep(0)
    gate.release()  # hands the slot to `first`...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)  # the slot went on to `second`
    assert (gate.in_use, gate.waiting) == (1, 0)
    gate.release()
    assert gate.in_use == 0


async def test_many_cancellations_never_leak() -> None:
    gate = Gate(3)

    async def user(hold: float) -> None:
        await gate.acquire(None)
        try:
            await asyncio.sleep(hold)
        finally:
            gate.release()

    tasks = [asyncio.create_task(user(0.01 * (n % 5))) for n in range(200)]
    # Cancel once some users have been and gone: holders, waiters and the finished mixed.
    await eventually(lambda: sum(task.done() for task in tasks) >= 10)
    for task in tasks[::2]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert (gate.in_use, gate.waiting) == (0, 0)
