"""The docs stay true: the configuration reference is generated from the settings, the README leads with the
two commands and stays short, every price is documented, and every relative link points at a file."""

import re
from pathlib import Path

from cloud_service.settings import CloudSettings
from edge_agent.settings import EdgeSettings
from gkt.config_docs import DEFAULT_PATH, render

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIGURATION = DEFAULT_PATH.read_text()


def test_configuration_reference_is_generated_from_the_settings() -> None:
    assert CONFIGURATION == render(), "docs/CONFIGURATION.md is out of date: run `gkt config-docs`"


def test_every_setting_and_its_default_is_in_the_configuration_reference() -> None:
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in CONFIGURATION.splitlines() if line.startswith("| `GKT_")}
    for cls, prefix in ((CloudSettings, "GKT_CLOUD_"), (EdgeSettings, "GKT_EDGE_")):
        for name, field in cls.model_fields.items():
            default = rows[f"`{prefix}{name.upper()}`"]
            value = field.default
            expected = ("none" if value is None else "empty" if value == "" else
                        f"`{str(value).lower()}`" if isinstance(value, bool) else f"`{value}`")
            assert default == expected, name


def test_two_commands_first() -> None:
    head = README[:1500]
    assert "make run" in head and "make test" in head


def test_readme_is_short() -> None:
    assert len(README.splitlines()) <= 200


def test_every_price_is_documented() -> None:
    from shared.cost import PRICE_NAMES

    evaluation = (ROOT / "docs" / "EVALUATION.md").read_text()
    for name, (var, _, _) in PRICE_NAMES.items():
        assert f"`{var}`" in CONFIGURATION and f"`{var}`" in evaluation and f"`{name}`" in evaluation, name


def test_relative_links_point_at_files() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name}: {target}"
