"""The CLI tests reuse the client tests' loopback server with scripted servicers."""

from tests.client.conftest import fake_stack_module, fakes  # noqa: F401 (fixtures)
