"""service/frontends/protocol.py: a front end's request records travel as one tally per series."""

from __future__ import annotations

import pytest

from service.frontends.link import EngineEndpoint
from service.frontends.protocol import ENCODER, TO_ENGINE, Observed, Tallies, Tally
from service.logs import RequestRecord
from service.metrics import Metrics


def test_records_of_one_series_travel_as_one_tally_with_every_latency() -> None:
    observed = [
        Observed("/v1/classify", "a", 200, 3.0, "k1", "acme"),
        Observed("/v1/classify", "b", 200, 5.0, "k1", "acme"),
        Observed("/v1/classify", "a", 200, 7.0, "k1", "acme"),
        Observed("/v1/classify", "a", 404, 1.0, "k1", "acme"),
        Observed("/v1/classify", None, 429, 0.0, "k1", "acme", "rate_limited"),
        Observed("/v1/classify", None, 429, 0.0, "k1", "acme", "rate_limited"),
    ]
    message = TO_ENGINE.decode(ENCODER.encode(Tallies.of(observed)))
    assert isinstance(message, Tallies)
    assert message.tallies == [
        Tally("/v1/classify", "a", 200, "k1", "acme", None, [3.0, 7.0]),
        Tally("/v1/classify", "b", 200, "k1", "acme", None, [5.0]),
        Tally("/v1/classify", "a", 404, "k1", "acme", None, [1.0]),
        Tally("/v1/classify", None, 429, "k1", "acme", "rate_limited", [0.0, 0.0]),
    ]


def _requests_part(metrics: Metrics) -> list[str]:
    """The exposition lines of the request series (counts, latency histogram, tenants' requests)."""
    lines = metrics.render().decode().splitlines()
    return [
        line
        for line in lines
        if line.startswith(("ptserve_request", "ptserve_tenant_requests")) and "_created{" not in line
    ]


def test_the_engine_counts_a_tally_as_one_process_counts_its_requests() -> None:
    """A tally counted by the engine leaves the registry as the same requests counted one at a time by
    one process's request log: counters, the latency histogram's buckets and sum, tenants; refusals
    count once each."""
    latencies = (3.0, 70.0, 7.0, 4.0)
    observed = [Observed("/v1/classify", "a", 200, ms, "k1", "acme") for ms in latencies]
    observed += [Observed("/v1/classify", None, 429, 0.0, "k1", "acme", "rate_limited")] * 2
    endpoint = EngineEndpoint.__new__(EngineEndpoint)  # the counting only: no socket, no runtime
    endpoint.metrics = tallied = Metrics(lambda: None)
    for tally in Tallies.of(observed).tallies:
        endpoint._count(tally)

    one_process = Metrics(lambda: None)
    for ms in latencies:
        one_process.observe_request(
            RequestRecord("r", "POST", "/v1/classify", "/v1/classify", "a", "v1", 200, ms, "k1", "acme")
        )
    assert _requests_part(tallied) == _requests_part(one_process)
    series = {"route": "/v1/classify", "task": "a", "status": "200"}
    get = tallied.registry.get_sample_value
    assert get("ptserve_requests_total", series) == 4
    assert get("ptserve_request_duration_seconds_bucket", series | {"le": "0.005"}) == 2
    assert get("ptserve_request_duration_seconds_sum", series) == pytest.approx(0.084)
    assert get("ptserve_tenant_refusals_total", {"tenant": "acme", "reason": "rate_limited"}) == 2
