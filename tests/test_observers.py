"""Exchange observers: the no-op base and the fan-out beside it (service/exchange.py)."""

from __future__ import annotations

from service.errors import Reason
from service.exchange import Exchange, ExchangeObserver, Observers, report_refused


class Recorder(ExchangeObserver):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def started(self, exchange: Exchange) -> None:
        self.log.append(f"{self.name}.started")

    def headers(self, exchange: Exchange) -> None:
        self.log.append(f"{self.name}.headers")

    def failing(self, exchange: Exchange) -> None:
        self.log.append(f"{self.name}.failing")

    def finished(self, exchange: Exchange) -> None:
        self.log.append(f"{self.name}.finished")


class FinishedOnly(ExchangeObserver):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def finished(self, exchange: Exchange) -> None:
        self.log.append("only.finished")


def exchange() -> Exchange:
    return Exchange(method="GET", route="r", upstream="u")


def test_every_event_reaches_every_observer_in_order() -> None:
    log: list[str] = []
    fan_out = Observers([Recorder("a", log), FinishedOnly(log), Recorder("b", log)])
    record = exchange()
    fan_out.started(record)
    fan_out.headers(record)
    fan_out.failing(record)
    fan_out.finished(record)
    assert log == [
        "a.started", "b.started",
        "a.headers", "b.headers",
        "a.failing", "b.failing",
        "a.finished", "only.finished", "b.finished",
    ]  # fmt: skip


def test_the_base_observer_does_nothing() -> None:
    record = exchange()
    before = vars(record).copy()
    observer = ExchangeObserver()
    report_refused(observer, record, Reason.BAD_REQUEST)
    # Only report_refused's own marks changed the record; the observer added nothing.
    assert record.status == 400 and record.response_complete
    assert set(vars(record)) == set(before)


def test_a_refusal_reports_started_failing_finished() -> None:
    log: list[str] = []
    report_refused(Observers([Recorder("a", log)]), exchange(), Reason.BAD_REQUEST)
    assert log == ["a.started", "a.failing", "a.finished"]


def test_an_empty_fan_out_accepts_every_event() -> None:
    fan_out = Observers([])
    record = exchange()
    for event in (fan_out.started, fan_out.headers, fan_out.failing, fan_out.finished):
        event(record)
    assert fan_out.observers == ()
