"""README stays true: every setting is documented, the two commands lead."""

from pathlib import Path

from cloud_service.settings import CloudSettings
from edge_agent.settings import EdgeSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    for cls, prefix in ((CloudSettings, "GKT_CLOUD_"), (EdgeSettings, "GKT_EDGE_")):
        for name in cls.model_fields:
            assert f"`{prefix}{name.upper()}`" in README, name


def test_two_commands_first() -> None:
    head = README[:1500]
    assert "make run" in head and "make test" in head


def test_every_price_is_in_the_readme() -> None:
    from shared.cost import PRICE_NAMES

    for name, (var, _, _) in PRICE_NAMES.items():
        assert f"`{var}`" in README and f"`{name}`" in README, name

