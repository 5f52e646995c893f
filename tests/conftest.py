"""Test-session set-up."""

from hessspec.runtime import tune_cpu_allocator


def pytest_configure(config) -> None:
    # As the command line does on the CPU: large activation buffers are reused instead of page-faulted in again.
    tune_cpu_allocator()
