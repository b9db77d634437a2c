"""How PHP decodes request parameters, and how Moodle validates them.

PHP turns ``name[]=a&name[]=b`` into an array and ``name[key]=v`` into a map
before Moodle sees anything; Moodle's ``external_api::validate_parameters``
then checks the result against the function's declared parameters.  Both are
reproduced here closely enough that a client encoding parameters wrongly
(Python ``True``, a missing ``[]``, an unexpected key) is refused the way a
real Moodle refuses it: with an ``invalidparameter`` error object.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

#: ``name`` followed by any number of ``[key]`` parts.
_PHP_KEY: Final = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PHP_PART: Final = re.compile(r"\[([^\[\]]*)\]")
_PARAM_INT: Final = re.compile(r"-?(0|[1-9][0-9]*)")
_PARAM_ALPHA: Final = re.compile(r"[A-Za-z]*")
_TAG: Final = re.compile(r"<[^>]*>")


class InvalidParameter(Exception):
    """Moodle's ``invalid_parameter_exception``; the text is its debuginfo."""


@dataclass(frozen=True)
class Value:
    """``external_value``: one scalar.

    Attributes:
        type: ``int``, ``bool``, ``text``, ``alpha`` or ``raw`` (PARAM_*).
        required: VALUE_REQUIRED; otherwise VALUE_DEFAULT with ``default``.
        default: the value used when an optional parameter is absent.
    """

    type: str
    required: bool = True
    default: Any = None


@dataclass(frozen=True)
class Multiple:
    """``external_multiple_structure`` of scalars."""

    item: Value


@dataclass(frozen=True)
class Single:
    """``external_single_structure`` of scalars."""

    fields: Mapping[str, Value]


Spec = Value | Multiple | Single


def decode_php(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Decode query or form pairs the way PHP fills ``$_GET``/``$_POST``.

    ``[]`` appends to an array, ``[key]`` sets a key (numeric keys become
    ints), and a repeated plain name keeps its last value.  Arrays are
    returned as dicts in insertion order.
    """
    result: dict[str, Any] = {}
    for name, value in pairs:
        match = _PHP_KEY.match(name)
        if match is None:
            result[name] = value
            continue
        keys = _PHP_PART.findall(match.group(2))
        if not keys:
            result[match.group(1)] = value
            continue
        node = result.setdefault(match.group(1), {})
        if not isinstance(node, dict):
            node = result[match.group(1)] = {}
        for key in keys[:-1]:
            child = node.setdefault(_php_key(node, key), {})
            if not isinstance(child, dict):
                child = node[_php_key(node, key)] = {}
            node = child
        node[_php_key(node, keys[-1])] = value

    return result


def _php_key(node: dict[Any, Any], key: str) -> Any:
    if key == "":
        ints = [k for k in node if isinstance(k, int)]
        return max(ints) + 1 if ints else 0
    return int(key) if _PARAM_INT.fullmatch(key) else key


def plain(value: Any) -> Any:
    """Arrays with keys 0..n-1 as lists, for readable call records."""
    if isinstance(value, dict):
        converted = {k: plain(v) for k, v in value.items()}
        if list(converted) == list(range(len(converted))):
            return list(converted.values())
        return {str(k): v for k, v in converted.items()}
    return value


def validate(
    signature: Mapping[str, Spec], params: Mapping[str, Any]
) -> dict[str, Any]:
    """Check ``params`` against a function's declared parameters.

    Returns:
        The cleaned values (ints, bools, strings, lists and dicts).

    Raises:
        InvalidParameter: a parameter is missing, unexpected or malformed.
    """
    return _single(signature, params, "")


def _single(fields: Mapping[str, Spec], value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidParameter(f"{where}Only arrays accepted.")
    unexpected = [str(k) for k in value if k not in fields]
    if unexpected:
        raise InvalidParameter(
            f"{where}Unexpected keys ({', '.join(unexpected)}) detected in "
            "parameter array."
        )
    cleaned: dict[str, Any] = {}
    for name, spec in fields.items():
        if name not in value:
            if isinstance(spec, Value) and not spec.required:
                cleaned[name] = spec.default
                continue
            raise InvalidParameter(
                f"{where}Missing required key in single structure: {name}"
            )
        cleaned[name] = _check(spec, value[name], f"{where}{name} => ")

    return cleaned


def _check(spec: Spec, value: Any, where: str) -> Any:
    if isinstance(spec, Single):
        return _single(spec.fields, value, where)
    if isinstance(spec, Multiple):
        if not isinstance(value, Mapping | list):
            raise InvalidParameter(f"{where}Only arrays accepted.")
        items = value.values() if isinstance(value, Mapping) else value
        return [_scalar(spec.item, item, where) for item in items]
    return _scalar(spec, value, where)


def _scalar(spec: Value, value: Any, where: str) -> Any:
    # validate_param() cleans the value and refuses it when the cleaned text
    # differs from the original: "True" is not a PARAM_BOOL, "07" no PARAM_INT.
    if not isinstance(value, str):
        raise InvalidParameter(f"{where}Invalid external api parameter")
    problem = f"{where}Invalid external api parameter: the value is {value!r}"
    if spec.type == "int":
        if not _PARAM_INT.fullmatch(value):
            raise InvalidParameter(problem)
        return int(value)
    if spec.type == "bool":
        if value not in ("0", "1"):
            raise InvalidParameter(problem)
        return value == "1"
    if spec.type == "alpha" and not _PARAM_ALPHA.fullmatch(value):
        raise InvalidParameter(problem)
    if spec.type == "text" and _TAG.search(value):
        raise InvalidParameter(problem)
    return value
