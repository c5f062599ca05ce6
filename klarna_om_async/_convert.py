"""The package's one cattrs converter: models to JSON bytes and back.

Rules: optional fields left at None are omitted on output; unknown keys in Klarna's answers
are ignored; ints and strs are taken as they are, never coerced (a float is not money);
datetimes are ISO 8601 and always timezone-aware, dates ISO 8601 (``1981-09-06``); tuples travel
as JSON arrays.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any, TypeVar, Union, get_args, get_origin

import attrs
import cattrs
import orjson
from cattrs.cols import (
    homogenous_tuple_structure_factory,
    is_mutable_sequence,
    is_sequence,
    list_structure_factory,
)
from cattrs.fns import identity
from cattrs.preconf.orjson import make_converter
from cattrs.strategies import configure_union_passthrough

from .models import (
    Address,
    Capture,
    CaptureRequest,
    ExtendDueDateOptions,
    ExtendDueDateRequest,
    Order,
    OrderLine,
    Refund,
    RefundRequest,
    ShippingInfo,
    UpdateAuthorizationRequest,
    UpdateMerchantReferencesRequest,
    UpdateShippingAddressRequest,
)

__all__ = ("converter", "from_json", "to_json")

T = TypeVar("T")

converter = make_converter(omit_if_default=True, forbid_extra_keys=False)


def _exact(kind: type[object]) -> Callable[[object, Any], object]:
    """Take a JSON value only if it already has the right class; never coerce it."""

    def structure(value: object, cls: Any) -> object:
        if value.__class__ is not kind:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        # The hook also serves subclasses, such as a str enum.
        return value if cls is kind else cls(value)

    return structure


def _exact_or_none(kind: type[object]) -> Callable[[object, Any], object]:
    """``kind | None`` in one call (cattrs' optional hook would make two per field)."""

    def structure(value: object, _: object) -> object:
        if value is None or value.__class__ is kind:
            return value
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")

    return structure


def _structure_datetime(value: str, _: object) -> datetime:
    moment = datetime.fromisoformat(value)
    # Klarna always sends an offset or Z; should one be missing, its clocks are UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _structure_date(value: str, _: object) -> date:
    if value.__class__ is not str:
        raise TypeError(f"expected an ISO 8601 date string, got {type(value).__name__}")
    return date.fromisoformat(value)


def _union_args(kind: object) -> tuple[Any, ...]:
    return get_args(kind) if get_origin(kind) in (Union, types.UnionType) else ()


def _is_str_enum(kind: object) -> bool:
    return isinstance(kind, enum.EnumMeta) and issubclass(kind, enum.StrEnum)


def _is_enum_or_str(kind: object) -> bool:
    """``SomeStrEnum | str`` (optionally ``| None``), the type of fields Klarna may extend."""
    extra = set(_union_args(kind)) - {str, type(None)}
    return len(extra) == 1 and str in _union_args(kind) and _is_str_enum(extra.pop())


def _is_json_native(kind: object) -> bool:
    """A union orjson writes as is: of str, int, None and str enums."""
    args = _union_args(kind)
    return bool(args) and all(a in (str, int, type(None)) or _is_str_enum(a) for a in args)


def _objects_only(cls: type[object]) -> Callable[[object, object], object]:
    structure = converter.gen_structure_attrs_fromdict(cls)

    def check(value: object, _: object) -> object:
        # cattrs would read any container (e.g. "[]") as a model with every field unset.
        if value.__class__ is not dict:
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        return structure(value, cls)

    return check


def _structure_by_init(cls: type[Any]) -> Callable[[object, object], object]:
    """Build the model straight from the JSON object: its validators check every value.

    cattrs' per-field checks would check each value's type a second time; on a capture's
    lines and addresses that doubled the cost of reading Klarna's answer.
    """
    names = frozenset(field.name for field in attrs.fields(cls))
    required = frozenset(f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING)

    def structure(value: object, _: object) -> object:
        if value.__class__ is not dict:
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        fields: dict[str, Any] = value
        if not names >= fields.keys() >= required:
            # Drop fields Klarna added after this release; a missing required field is
            # passed as None so that its validator names it ("quantity: is required").
            fields = {**dict.fromkeys(required), **fields}
            fields = {name: item for name, item in fields.items() if name in names}
        # A bad value raises ValidationError (a ValueError), which from_json reports as
        # the JSON not fitting the model.
        return cls(**fields)

    return structure


def _arrays_only(kind: Any) -> Callable[[object, object], object]:
    factory = (
        list_structure_factory if is_mutable_sequence(kind) else homogenous_tuple_structure_factory
    )
    structure = factory(kind, converter)

    def check(value: object, _: object) -> object:
        # cattrs would read {} as an empty list: "no captures" when Klarna said something else.
        if value.__class__ is not list:
            raise TypeError(f"expected a JSON array, got {type(value).__name__}")
        return structure(value, kind)

    return check


def _passthrough(value: T, _: object = None) -> T:
    return value


def _optional_inner(kind: object) -> Any:
    """``X`` of ``X | None`` when X is a model, a sequence, a datetime or a date; else None."""
    args = _union_args(kind)
    if len(args) != 2 or type(None) not in args:
        return None
    inner = args[0] if args[1] is type(None) else args[1]
    if attrs.has(inner) or is_sequence(inner) or inner in (datetime, date):
        return inner
    return None


def _structure_optional(kind: object) -> Callable[[object, object], object]:
    """``X | None`` with X's hook looked up once (cattrs' own looks it up on every value)."""
    inner = _optional_inner(kind)
    structure = converter.get_structure_hook(inner)

    def optional(value: object, _: object) -> object:
        return None if value is None else structure(value, inner)

    return optional


def _model_items(kind: object) -> type[object] | None:
    """The model class of ``tuple[Model, ...]`` or ``tuple[Model, ...] | None``, else None."""
    args = _union_args(kind)
    if args:
        if len(args) != 2 or type(None) not in args:
            return None
        (kind,) = (arg for arg in args if arg is not type(None))
    if get_origin(kind) is not tuple:
        return None
    item, *rest = get_args(kind)
    return item if rest == [Ellipsis] and attrs.has(item) else None


def _unstructure_model_items(kind: object) -> Callable[[Any], Any]:
    """A list comprehension over the item hook: cattrs' generic one goes through a generator."""
    item = converter.get_unstructure_hook(_model_items(kind))

    def unstructure(value: Any) -> Any:
        return None if value is None else [item(entry) for entry in value]

    return unstructure


converter.register_structure_hook(int, _exact(int))
converter.register_structure_hook(str, _exact(str))
converter.register_structure_hook(int | None, _exact_or_none(int))
converter.register_structure_hook(str | None, _exact_or_none(str))
converter.register_structure_hook(bool | None, _exact_or_none(bool))
# The orjson preset lets bool through as an int (its subclass); True is not an amount.
configure_union_passthrough(str | int | None, converter)
converter.register_structure_hook_factory(attrs.has, _objects_only)
# The leaf models: no nested model, and a validator on every field (they double as requests).
for _leaf in (OrderLine, ShippingInfo, Address):
    converter.register_structure_hook(_leaf, _structure_by_init(_leaf))
converter.register_structure_hook_factory(is_sequence, _arrays_only)
converter.register_structure_hook(datetime, _structure_datetime)
converter.register_unstructure_hook(datetime, datetime.isoformat)
converter.register_structure_hook(date, _structure_date)
converter.register_unstructure_hook(date, date.isoformat)
# The model field's own converter maps a known value to the enum member and keeps an unknown
# one as str; it must run for hand-built models anyway, so cattrs only passes the value on.
converter.register_structure_hook_func(_is_enum_or_str, _passthrough)
converter.register_structure_hook_factory(
    lambda kind: _optional_inner(kind) is not None, _structure_optional
)
# cattrs inlines its own `identity` as a plain attribute read: no call per optional field.
converter.register_unstructure_hook_func(_is_json_native, identity)
converter.register_unstructure_hook_factory(
    lambda kind: _model_items(kind) is not None, _unstructure_model_items
)

_REQUESTS = (
    CaptureRequest,
    RefundRequest,
    UpdateAuthorizationRequest,
    UpdateMerchantReferencesRequest,
    UpdateShippingAddressRequest,
    ExtendDueDateRequest,
)
_RESPONSES = (Capture, Refund, Order, ExtendDueDateOptions)
_MODELS = (OrderLine, ShippingInfo, Address, *_REQUESTS, *_RESPONSES)
# Built once at import, so the first capture of a batch pays no code generation.
_UNSTRUCTURE: dict[object, Callable[[Any], Any]] = {
    cls: converter.get_unstructure_hook(cls) for cls in _MODELS
}
_STRUCTURE: dict[object, Callable[[Any, Any], Any]] = {
    cls: converter.get_structure_hook(cls) for cls in (*_MODELS, list[Capture])
}


def to_json(value: object) -> bytes:
    """Serialize a model (or a dict/list of models) to JSON bytes, omitting unset fields."""
    hook = _UNSTRUCTURE.get(value.__class__)
    return orjson.dumps(hook(value) if hook is not None else converter.unstructure(value))


def from_json(data: bytes, cls: type[T]) -> T:
    """Parse Klarna's JSON into ``cls``; raises ValueError if it is not JSON of that shape.

    Never raises ``ValidationError``: that error means a request was refused before sending,
    while a bad answer comes after Klarna acted.
    """
    hook = _STRUCTURE.get(cls) or converter.get_structure_hook(cls)
    try:
        result: T = hook(orjson.loads(data), cls)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error}") from error
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError, AttributeError) as error:
        detail = "; ".join(_describe(error))
        raise ValueError(f"not a valid {_name(cls)}: {detail}") from error
    return result


def _describe(error: BaseException) -> list[str]:
    if isinstance(error, cattrs.BaseValidationError):
        return cattrs.transform_error(error, format_exception=_format_exception)
    return [_format_exception(error, None)]


def _format_exception(error: BaseException, _type: object) -> str:
    return f"{type(error).__name__}: {error}"


def _name(cls: object) -> str:
    # list[Capture].__name__ is "list"; its str() names the items too.
    return str(cls) if get_args(cls) else getattr(cls, "__name__", str(cls))
