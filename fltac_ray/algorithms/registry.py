"""Where algorithms come from: the built-in ones, ones registered by the user's code, and any
class named as `package.module:ClassName` in an experiment's `algorithm:` field.

Resolving a name imports only the algorithm's own module (numpy, no torch), so config
validation stays fast. The schema (config.py) checks `algorithm:` through the resolver this module
installs there when imported; config.py imports no algorithm code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fltac_ray.config import install_algorithm_resolver

if TYPE_CHECKING:
    from fltac_ray.algorithms.base import FederatedAlgorithm

BUILTIN: dict[str, str] = {
    "fltac": "fltac_ray.algorithms.fltac:FLTAC",
    "fedit": "fltac_ray.algorithms.fedit:FedIT",
    "hetlora": "fltac_ray.algorithms.hetlora:HetLoRA",
    "flexlora": "fltac_ray.algorithms.flexlora:FlexLoRA",
    "flora": "fltac_ray.algorithms.flora:FLoRA",
    "oracle": "fltac_ray.algorithms.oracle:OracleClustering",
    "ifca": "fltac_ray.algorithms.ifca:IFCA",
    "floral": "fltac_ray.algorithms.floral:FLoRAL",
    "fedsa": "fltac_ray.algorithms.fedsa:FedSALoRA",
    "ffa": "fltac_ray.algorithms.ffa:FFALoRA",
    "local": "fltac_ray.algorithms.local:LocalOnly",
    "centralized": "fltac_ray.algorithms.centralized:Centralized",
    "fedprox": "fltac_ray.algorithms.fedprox:FedProx",
    "scaffold": "fltac_ray.algorithms.scaffold:Scaffold",
    "fedadam": "fltac_ray.algorithms.fedadam:FedAdam",
}
_REGISTERED: dict[str, type[FederatedAlgorithm]] = {}


class UnknownAlgorithm(ValueError):
    """The `algorithm:` field names nothing that resolves to an algorithm class."""


def register_algorithm(cls: type[FederatedAlgorithm]) -> type[FederatedAlgorithm]:
    """Class decorator: make `cls` available as `algorithm: <cls.name>` in this process.

        @register_algorithm
        class MyFedProx(FederatedAlgorithm):
            name = "my_fedprox"
            ...
    """
    from fltac_ray.algorithms.base import FederatedAlgorithm

    if not (isinstance(cls, type) and issubclass(cls, FederatedAlgorithm)):
        raise TypeError(f"register_algorithm needs a FederatedAlgorithm subclass, got {cls!r}")
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"{cls.__name__}.name = {cls.name!r}: needs a name made of letters, digits and _")
    if cls.name in BUILTIN:
        raise ValueError(f"{cls.__name__}.name = {cls.name!r}: taken by a built-in algorithm")
    _REGISTERED[cls.name] = cls
    return cls


def _import(path: str) -> type[FederatedAlgorithm]:
    from fltac_ray.algorithms.base import FederatedAlgorithm

    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownAlgorithm(f"cannot import module {module_name!r} ({exc})") from exc
    cls = getattr(module, attribute, None)
    if cls is None:
        raise UnknownAlgorithm(f"module {module_name!r} has no attribute {attribute!r}")
    if not (isinstance(cls, type) and issubclass(cls, FederatedAlgorithm)):
        raise UnknownAlgorithm(f"{path} is not a subclass of fltac_ray.algorithms.FederatedAlgorithm")
    return cls


def resolve_algorithm(name: str) -> type[FederatedAlgorithm]:
    """The class behind an `algorithm:` value; UnknownAlgorithm says what is allowed."""
    if name in BUILTIN:
        return _import(BUILTIN[name])
    if name in _REGISTERED:
        return _REGISTERED[name]
    module, sep, attribute = name.partition(":")
    if sep and module and attribute.isidentifier():
        return _import(name)
    raise UnknownAlgorithm(
        f"unknown algorithm; use one of {sorted(BUILTIN) + sorted(_REGISTERED)}, a class registered "
        "with fltac_ray.register_algorithm, or 'package.module:ClassName'")


def algorithm_summaries() -> dict[str, str]:
    """name -> one-line summary of every built-in and registered algorithm."""
    return {name: resolve_algorithm(name).summary for name in [*BUILTIN, *_REGISTERED]}


install_algorithm_resolver(resolve_algorithm)
