"""Where telemetry meets a store's calls: at the methods' definitions, free when off.

The store's public methods are decorated where they are defined (``@observed("ping")``,
``@observed_iterator("iter_packages")``). A decorated method looks at its store's
observer: with none (``telemetry=False``, the default) it is the method itself, one
attribute check dearer; with one (``kvstore.redis.telemetry.Observer``, imported only
with ``telemetry=True``), the call runs inside the observer's span and measurement. No
store's method is ever replaced on the instance, so what a reader sees in the class is
what runs.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
Y = TypeVar("Y")


class Observer(Protocol):
    """What a store's observer does with a call (``kvstore.redis.telemetry.Observer``)."""

    def call(self, name: str, work: Coroutine[Any, Any, R]) -> Coroutine[Any, Any, R]: ...

    def iterate(self, name: str, work: AsyncIterator[Y]) -> AsyncIterator[Y]: ...


class Observed(Protocol):
    """A store whose calls may be observed: ``None`` when telemetry is off."""

    @property
    def observer(self) -> Observer | None: ...


S = TypeVar("S", bound=Observed)


def observed(
    name: str,
) -> Callable[
    [Callable[Concatenate[S, P], Coroutine[Any, Any, R]]],
    Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
]:
    """Observe a coroutine method as the operation ``name``."""

    def decorate(
        method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
        @functools.wraps(method)
        def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
            # Not a coroutine itself: off, the caller awaits the method's own coroutine.
            observer = self.observer
            if observer is None:
                return method(self, *args, **kwargs)
            return observer.call(name, method(self, *args, **kwargs))

        return call

    return decorate


def observed_iterator(
    name: str,
) -> Callable[
    [Callable[Concatenate[S, P], AsyncIterator[Y]]],
    Callable[Concatenate[S, P], AsyncIterator[Y]],
]:
    """Observe a method returning an async iterator as the operation ``name``."""

    def decorate(
        method: Callable[Concatenate[S, P], AsyncIterator[Y]],
    ) -> Callable[Concatenate[S, P], AsyncIterator[Y]]:
        @functools.wraps(method)
        def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[Y]:
            observer = self.observer
            if observer is None:
                return method(self, *args, **kwargs)
            return observer.iterate(name, method(self, *args, **kwargs))

        return call

    return decorate
