"""The CLI tests reuse the client tests' servers (scripted servicers; the real merge service)."""

from tests.client.conftest import fake_stack_module, fakes, real_merge  # noqa: F401 (fixtures)
