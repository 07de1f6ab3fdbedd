"""rq-dashboard, as the README starts it, on a Redis holding a failed job of ours."""

import base64
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request

import payloads
import pytest
from conftest import GRAPH_BASE, free_port, rows, wait_for
from rq.registry import FailedJobRegistry

SEND_URL = f"{GRAPH_BASE}/v24.0/{payloads.ACCOUNT_ID}/messages"
USER, PASSWORD = "admin", "dashboard-test-pw"


def get(url, auth=True):
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def dashboard(redis_server, tmp_path):
    """rq-dashboard on the tests' Redis, with a username and password."""
    binary = shutil.which("rq-dashboard", path=os.path.dirname(os.sys.executable))
    port = free_port()
    env = {
        **os.environ,
        "RQ_DASHBOARD_USERNAME": USER,
        "RQ_DASHBOARD_PASSWORD": PASSWORD,
    }
    proc = subprocess.Popen(
        [
            binary,
            "--redis-url",
            redis_server,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: _answers(url), seconds=20)
    yield url
    proc.terminate()
    proc.wait(10)


def _answers(url):
    try:
        return get(url + "/0/data/queues.json", auth=False)[0] in (200, 401)
    except OSError:
        return False


def test_dashboard_lists_our_failed_job_without_personal_data(
    dashboard, post, work, requests_mock, store, queue
):
    sender = payloads.new_id()
    requests_mock.post(SEND_URL, status_code=400, json={"error": {"code": 551}})
    post(payloads.delivery(payloads.text_message(sender, "my private words")))
    work()
    [event] = rows(store, "webhook_events")

    status, body = get(f"{dashboard}/0/data/queues.json")
    assert status == 200
    assert queue.name in [q["name"] for q in json.loads(body)["queues"]]

    status, body = get(f"{dashboard}/0/data/jobs/{queue.name}/failed/20/asc/1.json")
    assert status == 200
    [job] = json.loads(body)["jobs"]
    assert job["id"] == event["job_id"]
    assert job["description"] == (
        f"message event {event['event_key']}: recipient_unavailable"
    )
    everything = (
        body.decode() + get(f"{dashboard}/0/data/job/{job['id']}.json")[1].decode()
    )
    for secret in (sender, "my private words", payloads.ACCESS_TOKEN):
        assert secret not in everything


def test_dashboard_refuses_anyone_without_the_password(dashboard):
    assert get(f"{dashboard}/0/data/queues.json", auth=False)[0] == 401


def test_a_job_requeued_the_dashboards_way_resolves_its_dead_letter(
    dashboard, post, work, requests_mock, store, queue
):
    requests_mock.post(SEND_URL, status_code=400, json={"error": {"code": 551}})
    post(payloads.delivery(payloads.text_message(payloads.new_id())))
    work()
    [job_id] = FailedJobRegistry(queue=queue).get_job_ids()

    # The dashboard's "requeue" button calls RQ's requeue for the failed job.
    FailedJobRegistry(queue=queue).requeue(job_id)
    requests_mock.post(SEND_URL, json={"message_id": "m_ok"})
    work()

    [dead] = rows(store, "dead_letter")
    assert dead["status"] == "resolved"
    assert rows(store, "webhook_events")[0]["status"] == "done"
