import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50)
settings.load_profile("ci")


@pytest.fixture
def compose():
    from quantfw.config.compose import compose as _compose

    return _compose
