"""Futures waiting for Redis to confirm subscriptions
(marketstream.upstream.confirmations)."""

import asyncio

from marketstream.upstream.confirmations import Confirmations


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_a_wait_ends_when_every_pending_name_is_resolved():
    async def scenario():
        confirmations = Confirmations()
        pending = {"trade.A_B", "trade.C_D"}
        waiting = asyncio.ensure_future(
            confirmations.wait(["trade.A_B", "trade.C_D", "trade.E_F"], pending.__contains__)
        )
        await asyncio.sleep(0)
        confirmations.resolve("trade.A_B")
        await asyncio.sleep(0)
        assert not waiting.done()  # trade.C_D still pending; trade.E_F was not
        confirmations.resolve("trade.C_D")
        return await waiting

    assert run(scenario()) is True


def test_nothing_pending_is_true_at_once():
    assert run(Confirmations().wait(["trade.A_B"], lambda name: False)) is True


def test_a_failure_a_timeout_or_a_lost_link_is_false():
    async def scenario():
        confirmations = Confirmations()
        failed = asyncio.ensure_future(confirmations.wait(["a"], lambda name: True))
        lost = asyncio.ensure_future(confirmations.wait(["b", "c"], lambda name: True))
        await asyncio.sleep(0)
        confirmations.resolve("a", ok=False)
        confirmations.fail_all()
        late = await confirmations.wait(["d"], lambda name: True, timeout=0.05)
        return await failed, await lost, late

    assert run(scenario()) == (False, False, False)
