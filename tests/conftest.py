"""Test-session set-up."""

import pytest

from hessspec.runtime import tune_cpu_allocator


def pytest_configure(config) -> None:
    # As the command line does on the CPU: large activation buffers are reused instead of page-faulted in again.
    tune_cpu_allocator()


@pytest.fixture(autouse=True)
def _fresh_trace_state(monkeypatch):
    # A failed trace makes "auto" avoid tracing for the rest of the process (hessspec.curvature.hessian): each test
    # starts as a fresh process would, whatever an earlier test traced.
    import hessspec.curvature.batch_products as batch_products

    monkeypatch.setattr(batch_products, "TRACE_FAILED", False)
