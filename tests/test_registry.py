"""Registries: names, duplicates, unknown names, gin integration, temporary entries."""

import gin
import pytest

from mdtzoo.registry import (
    FAMILIES,
    MASKING,
    DuplicateComponentError,
    Registry,
    UnknownComponentError,
    family,
)


class Dummy:
    """A dummy component."""

    def __init__(self, ratio=0.25, size=3):
        self.ratio, self.size = ratio, size


def test_families():
    assert list(FAMILIES) == [
        "masking", "interp", "posenc", "schedule", "weighting", "models",
        "datasets", "samplers", "guidance", "metrics",
    ]
    with pytest.raises(UnknownComponentError, match="known families: masking, interp"):
        family("maskng")


def test_duplicate_names_raise():
    with MASKING.temporary("dummy", Dummy):
        with pytest.raises(DuplicateComponentError, match="masking.dummy is already registered"):
            MASKING.add("dummy", Dummy)
    with pytest.raises(DuplicateComponentError):
        MASKING.add("random", Dummy)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownComponentError) as info:
        MASKING.get("randm")
    message = str(info.value)
    assert "unknown masking component 'randm'" in message
    for name in MASKING.names():
        assert name in message


def test_names_must_be_identifiers():
    with pytest.raises(ValueError, match="identifier"):
        Registry("toy").add("dit-xl/2", Dummy)


def test_temporary_entries_are_removed_from_registry_and_gin():
    with MASKING.temporary("dummy", Dummy):
        assert "dummy" in MASKING and "masking.dummy" in MASKING
        gin.parse_config("masking.dummy.ratio = 0.75")
        assert MASKING.build("dummy").ratio == 0.75
    gin.clear_config()
    assert "dummy" not in MASKING
    with pytest.raises(ValueError, match="No configurable matching 'masking.dummy'"):
        gin.parse_config("masking.dummy.ratio = 0.75")
    with MASKING.temporary("dummy", Dummy):  # the name can be registered again
        assert MASKING.build("dummy").ratio == 0.25


def test_build_applies_gin_bindings_and_explicit_kwargs_win():
    reg = Registry("toyfamily")
    reg.add("dummy", Dummy)
    try:
        gin.parse_config("toyfamily.dummy.ratio = 0.5")
        assert reg.build("dummy").ratio == 0.5
        assert reg.build("toyfamily.dummy").ratio == 0.5  # qualified names work too
        assert reg.build("dummy", ratio=0.1).ratio == 0.1
        assert reg.resolve("dummy").ratio == 0.5
        instance = Dummy(size=9)
        assert reg.resolve(instance) is instance
        assert reg.resolve(Dummy, size=2).size == 2  # a class (gin reference without parentheses) is called
    finally:
        reg.remove("dummy")


def test_describe_gives_qualified_names_and_first_doc_lines():
    reg = Registry("toyfamily2")
    reg.add("dummy", Dummy)
    try:
        assert reg.describe() == [("toyfamily2.dummy", "A dummy component.")]
    finally:
        reg.remove("dummy")


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_every_registered_component_has_a_one_line_doc(fam):
    for name, doc in FAMILIES[fam].describe():
        assert doc, f"{name} has no docstring"
        assert len(doc) < 140, f"{name}: first doc line too long for `mdtzoo list`"
