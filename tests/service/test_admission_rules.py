"""The admission rule itself (fair shares, a bound that follows measured throughput) and /feedback admission."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from flywheel.admission import Admission, FairBudget, OverloadedError, Throughput, sized_limit
from flywheel.broker import EmbeddedBroker
from tests.conftest import app_client, copy_home, free_port, local_metric
from tests.service.conftest import FAST_ENV


def test_a_flooding_principal_is_held_to_its_share_while_a_newcomer_is_admitted() -> None:
    budget = FairBudget(lambda: 100)
    assert all(budget.try_take("flood", 20) for _ in range(5))  # alone, it may use the whole bound
    assert not budget.try_take("flood", 20)
    # Another principal is admitted up to its share (100 / 2) although the bound is full ...
    assert budget.try_take("other", 30) and budget.try_take("other", 20)
    assert not budget.try_take("other", 1)
    # ... and the flooder is refused until it is back under the bound.
    for _ in range(3):
        budget.give("flood", 20)
    assert not budget.try_take("flood", 20)  # 40 + 50 + 20 > 100 and 60 > 50
    budget.give("flood", 20)
    assert budget.try_take("flood", 20)  # 20 + 50 + 20 <= 100
    # Every admission within shares: at most one bound beyond the bound.
    assert budget.total <= 2 * 100


def test_a_principal_holding_nothing_gets_one_request_in_whatever_its_size() -> None:
    budget = FairBudget(lambda: 16, one_each=True)
    assert budget.try_take("flood", 16)
    assert not budget.try_take("flood", 16)
    # A share of 8 texts would refuse every request of 16: the first one of a principal is let in all the same.
    assert budget.try_take("other", 16)
    assert not budget.try_take("other", 16)


def test_an_idle_worker_admits_any_request_however_large() -> None:
    budget = FairBudget(lambda: 10)
    assert budget.try_take("a", 256)
    assert not budget.try_take("a", 1)
    budget.give("a", 256)
    assert budget.total == 0 and budget.held("a") == 0


def test_retry_after_spreads_a_flood_by_the_demand_refused_not_only_the_work_in_flight() -> None:
    throughput = Throughput()
    throughput.observe(30, 1.0)  # 30 texts/s
    admission = Admission("predict", "texts", lambda: 16, throughput)
    held = admission.ticket()
    admission.admit_work(held, "flood", 16)  # the bound is full: one second of work in flight
    waits = []
    for _ in range(18):  # a flood of 18 more clients, 8 texts each
        with pytest.raises(OverloadedError) as refused:
            admission.admit_work(admission.ticket(), "flood", 8)
        waits.append(refused.value.retry_after)
    # The first is told one second, as the work in flight says; later ones are told when the refused demand
    # ahead of them would be served, so they do not all come back at once.
    assert waits[0] == 1
    assert waits == sorted(waits) and waits[-1] == (16 + 18 * 8 + 29) // 30
    held.release()


def test_the_bound_follows_measured_throughput_within_floor_and_ceiling() -> None:
    throughput = Throughput()
    limit = sized_limit(None, throughput, seconds=2.0, floor=64, ceiling=1000)
    assert limit() == 64  # nothing measured yet
    for _ in range(50):
        throughput.observe(100, 0.5)  # 200 texts/s
    assert limit() == 400
    for _ in range(100):
        throughput.observe(100, 0.05)  # a faster runtime: 2,000 texts/s
    assert limit() == 1000
    for _ in range(100):
        throughput.observe(10, 1.0)
    assert limit() == 64
    assert sized_limit(7, throughput, seconds=2.0, floor=64, ceiling=1000)() == 7
    assert sized_limit(None, Throughput(), seconds=2.0, floor=16, ceiling=1000, initial=64)() == 64


@pytest.mark.slow
def test_feedback_beyond_its_bound_is_refused_at_once_with_retry_after(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    env = {
        **copy_home(trained_home, tmp_path / "home"),
        **FAST_ENV,
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
        "FLYWHEEL_FEEDBACK_MAX_IN_FLIGHT": "1",
    }
    with app_client(env) as client:

        async def burst() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=client.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=60) as http:
                bodies = [{"text": f"a lovely film {i}", "label": "positive"} for i in range(20)]
                return await asyncio.gather(*(http.post("/feedback", json=body) for body in bodies))

        answers = asyncio.run(burst())
        statuses = [answer.status_code for answer in answers]
        assert set(statuses) <= {202, 503}, statuses
        assert 202 in statuses and 503 in statuses, statuses
        refused = [answer for answer in answers if answer.status_code == 503]
        assert all(int(answer.headers["retry-after"]) >= 1 for answer in refused)
        assert all("at capacity" in answer.json()["detail"] for answer in refused)
        # Once the burst is over, feedback is accepted again.
        again = client.post("/feedback", json={"text": "a lovely film, again", "label": "positive"})
        assert again.status_code == 202, again.text


@pytest.mark.slow
def test_requests_past_their_deadline_are_answered_504_without_being_computed(
    trained_home: dict[str, str], tmp_path: Path
) -> None:
    long = "the movie was really quite good and the plot was lovely " * 10
    # A broker of its own: thousands of predictions stay off the session's topic, which other tests read whole.
    with EmbeddedBroker(port=free_port()) as broker, app_client(
        {
            **copy_home(trained_home, tmp_path / "home"),
            **FAST_ENV,
            "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
            "FLYWHEEL_ADMISSION_MAX_TEXTS": "1000000",
            "FLYWHEEL_SERVE_TIMEOUT": "1",
        }
    ) as client:
        computed = local_metric("flywheel_batch_size_sum")
        expired = local_metric("flywheel_dropped_jobs_total", route="predict", reason="expired")

        async def burst() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=client.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=60) as http:
                body = {"texts": [f"{long} {i}" for i in range(256)]}
                return await asyncio.gather(*(http.post("/predict", json=body) for _ in range(32)))

        # 8,192 texts take the tiny model several seconds: the requests at the back wait past their 1 s deadline.
        statuses = [answer.status_code for answer in asyncio.run(burst())]
        late = statuses.count(504)
        assert set(statuses) <= {200, 504} and late >= 1, statuses
        assert local_metric("flywheel_dropped_jobs_total", route="predict", reason="expired") - expired == late
        assert local_metric("flywheel_batch_size_sum") - computed == 256 * statuses.count(200)
        assert client.post("/predict", json={"text": "a great film"}).status_code == 200


def test_the_rate_is_read_off_full_batches_so_a_quiet_spell_does_not_shrink_the_bound() -> None:
    throughput = Throughput(full=16)
    limit = sized_limit(None, throughput, seconds=0.5, floor=16, ceiling=1000, initial=64)
    for _ in range(50):
        throughput.observe(1, 0.02)  # single clients: 50 texts/s, half of what full batches do
    assert throughput.rate() is None and limit() == 64
    throughput.observe(32, 0.32)  # busy: 100 texts/s
    for _ in range(50):
        throughput.observe(1, 0.02)
    assert throughput.rate() == pytest.approx(100) and limit() == 50
