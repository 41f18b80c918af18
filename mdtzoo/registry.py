"""Plain-Python registries, one per component family, each entry also a gin configurable.

A registry maps a name to a callable (a class or a factory function). Registering
a name twice raises; asking for an unknown name raises an error that lists every
known name. Each entry is registered with gin under its family, so a gin file
says ``masking.random.ratio = 0.5`` and a sweep, a run name and a table use the
same ``masking.random`` string (STYLE.md, "one name per thing").

``Registry.build(name, **kwargs)`` calls the entry through gin, so bindings made
in gin files apply whether the component was chosen in gin (``@masking.random()``)
or by name from Python (``masking="random"``) - no binding is silently ignored.

    MASKING = Registry("masking")

    @MASKING.register("random")
    class RandomMasking: ...

    MASKING.build("random", ratio=0.5)
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import gin
import gin.config as _gin_config


class UnknownComponentError(KeyError):
    """An unknown component name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicateComponentError(ValueError):
    """A name registered twice in one family."""


def first_line(obj: Any) -> str:
    """The first line of an object's docstring ('' when it has none)."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry:
    """A named family of components (``masking``, ``interp``, ``models``, ...)."""

    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, Callable[..., Any]] = {}

    # -- registration -------------------------------------------------------------
    def register(self, name: str | None = None) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn_or_cls`` as ``<family>.<name>`` (default: its __name__)."""

        def decorator(obj: Callable) -> Callable:
            self.add(name or obj.__name__, obj)
            return obj

        return decorator

    def add(self, name: str, obj: Callable) -> None:
        """Register ``obj`` under ``name``; raises DuplicateComponentError if taken."""
        if not name.isidentifier():
            raise ValueError(
                f"{self.family}: component name {name!r} must be a Python identifier "
                "(it is used as a gin name, a sweep value and a run-name fragment)"
            )
        if name in self._entries:
            raise DuplicateComponentError(
                f"{self.family}.{name} is already registered "
                f"(by {_where(self._entries[name])}); pick another name"
            )
        gin.register(name, module=self.family)(obj)
        self._entries[name] = obj

    def remove(self, name: str) -> None:
        """Unregister ``name`` from this registry and from gin."""
        obj = self._entries.pop(name)
        selector = f"{self.family}.{name}"
        if selector in _gin_config._REGISTRY:
            _gin_config._REGISTRY.pop(selector)
        inverse = getattr(_gin_config, "_INVERSE_REGISTRY", None)
        if isinstance(inverse, dict):
            inverse.pop(obj, None)

    @contextlib.contextmanager
    def temporary(self, name: str, obj: Callable) -> Iterator[Callable]:
        """Register ``obj`` as ``name`` for the duration of a ``with`` block (for tests)."""
        self.add(name, obj)
        try:
            yield obj
        finally:
            self.remove(name)

    # -- lookup ---------------------------------------------------------------------
    def get(self, name: str) -> Callable[..., Any]:
        """The registered callable itself (no gin bindings applied)."""
        name = self._strip_family(name)
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownComponentError(
                f"unknown {self.family} component {name!r}; known {self.family} components: "
                f"{', '.join(self.names()) or '(none)'}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the entry ``name`` with gin bindings for ``<family>.<name>`` applied."""
        self.get(name)  # raises with the known names
        configured = gin.get_configurable(f"{self.family}.{self._strip_family(name)}")
        return configured(**kwargs)

    def resolve(self, spec: Any, **kwargs: Any) -> Any:
        """A component from a spec: a name is built, a class or factory (a gin reference
        without parentheses, ``@masking.block``) is called, an instance passes through."""
        if isinstance(spec, str):
            return self.build(spec, **kwargs)
        if inspect.isclass(spec) or inspect.isfunction(spec):
            return spec(**kwargs)
        return spec

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        """(qualified name, first docstring line) for every entry, sorted."""
        return [(f"{self.family}.{n}", first_line(self._entries[n])) for n in self.names()]

    def _strip_family(self, name: str) -> str:
        prefix = self.family + "."
        return name[len(prefix):] if name.startswith(prefix) else name

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._strip_family(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {self.names()})"


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


# One registry per family. Families that arrive with later parts of the library
# (datasets, samplers, guidance, metrics) are declared here so `mdtzoo list` knows them.
MASKING = Registry("masking")
INTERP = Registry("interp")
POSENC = Registry("posenc")
SCHEDULE = Registry("schedule")
WEIGHTING = Registry("weighting")
MODELS = Registry("models")
DATASETS = Registry("datasets")
SAMPLERS = Registry("samplers")
GUIDANCE = Registry("guidance")
METRICS = Registry("metrics")

FAMILIES: dict[str, Registry] = {
    r.family: r
    for r in (MASKING, INTERP, POSENC, SCHEDULE, WEIGHTING, MODELS, DATASETS, SAMPLERS, GUIDANCE, METRICS)
}


def family(name: str) -> Registry:
    """The registry of a family by name, with a clear error for unknown families."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownComponentError(
            f"unknown component family {name!r}; known families: {', '.join(FAMILIES)}"
        ) from None
