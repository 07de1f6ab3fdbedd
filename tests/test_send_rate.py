"""SEND_RATE_PER_SECOND: the whole service never sends more than that in a second."""

import dataclasses

import payloads
import pytest
from conftest import GRAPH_BASE

import queueing

SEND_URL = f"{GRAPH_BASE}/v24.0/{payloads.ACCOUNT_ID}/messages"


class FakeClock:
    def __init__(self, start):
        self.now = start
        self.slept = []

    def time(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_a_send_over_the_budget_waits_for_the_next_second(settings, queue):
    limited = dataclasses.replace(settings, send_rate_per_second=3)
    clock = FakeClock(1_900_000_000.25)

    for _ in range(3):
        queueing.wait_for_send_slot(queue.connection, limited, clock.time, clock.sleep)
    assert clock.slept == []

    queueing.wait_for_send_slot(queue.connection, limited, clock.time, clock.sleep)
    # The first of the three frees its slot a window after it was taken.
    assert clock.slept == [pytest.approx(queueing.SEND_WINDOW_SECONDS)]
    assert clock.now == pytest.approx(1_900_000_000.25 + queueing.SEND_WINDOW_SECONDS)


def test_zero_means_no_limit(settings, queue):
    unlimited = dataclasses.replace(settings, send_rate_per_second=0)
    clock = FakeClock(1_900_000_100.5)
    for _ in range(50):
        queueing.wait_for_send_slot(
            queue.connection, unlimited, clock.time, clock.sleep
        )
    assert clock.slept == []


def test_no_window_of_one_second_holds_more_than_the_limit(settings, queue):
    limited = dataclasses.replace(settings, send_rate_per_second=4)
    clock = FakeClock(1_900_000_200.9)
    taken = []
    for _ in range(20):
        queueing.wait_for_send_slot(queue.connection, limited, clock.time, clock.sleep)
        taken.append(clock.now)
        clock.now += 0.05

    for start in taken:
        assert sum(start <= t < start + 1 for t in taken) <= 4


def test_worker_never_sends_more_than_the_limit_in_a_second(
    post, work, requests_mock, monkeypatch
):
    import time

    monkeypatch.setenv("SEND_RATE_PER_SECOND", "2")
    stamps = []

    def answer(request, context):
        stamps.append(time.time())
        return {"message_id": f"m_{len(stamps)}"}

    requests_mock.post(SEND_URL, json=answer)
    for _ in range(5):
        post(payloads.delivery(payloads.text_message(payloads.new_id())))

    work()

    assert len(stamps) == 5
    for start in stamps:
        assert sum(start <= t < start + 1 for t in stamps) <= 2
