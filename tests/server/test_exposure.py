"""What a caller without a key can see: /healthz gives a status and a code, never the error's text;
/metrics on --metrics-port asks for a key when protect_metrics says so, as on the main port."""
from __future__ import annotations

import logging
import time

import httpx
import pytest

KEY = "secret-key-1"


def _app(**settings):
    from vqdm.server.app import create_app
    from vqdm.server.settings import Settings

    return create_app(Settings(devices=["cpu"], **settings), loader=lambda s, d: [])


@pytest.mark.parametrize("protect", [True, False])
def test_metrics_port_honours_protect_metrics(tools, protect):
    from fastapi.testclient import TestClient

    port = tools.free_port()
    with TestClient(_app(api_keys=[KEY], protect_metrics=protect, metrics_port=port, metrics_host="127.0.0.1")) as c:
        url = f"http://127.0.0.1:{port}/metrics"
        answers = {name: httpx.get(url, headers=headers, timeout=30) for name, headers in
                   (("none", {}), ("wrong", {"Authorization": "Bearer wrong-key-9"}),
                    ("key", {"Authorization": f"Bearer {KEY}"}))}
        main_port = c.get("/metrics")
    assert answers["key"].status_code == 200 and "vqdm_ready" in answers["key"].text
    if not protect:
        assert answers["none"].status_code == 200 == main_port.status_code
        return
    assert main_port.status_code == 401
    for name, code in (("none", "missing_api_key"), ("wrong", "invalid_api_key")):
        r = answers[name]
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (name, r.status_code)
        assert r.json()["error"]["code"] == code and "vqdm_" not in r.text


def test_healthz_and_readyz_answer_a_code_and_the_log_keeps_the_reason(caplog):
    from fastapi.testclient import TestClient

    from vqdm.server.app import create_app
    from vqdm.server.settings import Settings

    def broken_loader(settings, devices):
        raise FileNotFoundError("/srv/models/internal-name: no such folder")

    fatal: list[str] = []
    with caplog.at_level(logging.ERROR, logger="vqdm.server"), \
            TestClient(create_app(Settings(devices=["cpu"]), loader=broken_loader, on_fatal=fatal.append)) as c:
        deadline = time.monotonic() + 30
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.02)
        health, ready = c.get("/healthz"), c.get("/readyz")
    assert health.status_code == 503 and health.json() == {"status": "failed", "code": "load_failed"}
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "load_failed"
    assert "internal-name" not in health.text + ready.text
    assert any("internal-name" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)  # the operator's copy


def test_healthz_of_an_unhealthy_server_is_a_code():
    from fastapi.testclient import TestClient

    with TestClient(_app()) as c:
        c.app.state.vqdm.dispatcher.failures.mark_unhealthy("cpu", "device error on cpu: restart needed")
        health = c.get("/healthz")
    assert health.status_code == 503 and health.json() == {"status": "unhealthy", "code": "worker_unhealthy"}
