"""DCP's `.metadata` read without pickle semantics.

torch.distributed.checkpoint writes its index as a pickle and reads it with `pickle.load`,
which runs whatever the file asks for. Even an unpickler that allows only DCP's own classes
still lets a file BUILD state onto any object it can name, classes included (setting
`PosixPath.__truediv__` for the whole process). So the opcode stream is not executed here:
`pickletools.genops` only parses it, and `read_dcp_metadata` rebuilds what it describes
from plain values (str, int, float, bool, None, bytes, tuple, list, dict) and these
constructions, each with checked arguments:

- NEWOBJ + BUILD of DCP's metadata dataclasses: a fresh instance, its state a mapping of
  that dataclass's own fields (TensorProperties: its 5-tuple), applied once;
- REDUCE of torch.Size (ints), a torch layout by name, DCP's memory-format enum (an int),
  pathlib paths (strings) and an empty OrderedDict;
- dtypes named as globals (values, never called).

Anything else (another global, BUILD onto anything but a fresh instance, an opcode that
calls or imports) raises `MetadataRefused`; the result must be a DCP `Metadata`.
"""
from __future__ import annotations

import collections
import dataclasses
import pathlib
import pickletools
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata


class MetadataRefused(ValueError):
    """The `.metadata` stream describes something other than plain DCP metadata."""


# Dataclasses a NEWOBJ may create (and a BUILD then fill in): DCP's metadata records.
_DATACLASSES = {(cls.__module__, cls.__name__): cls for cls in (
    dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta, dcp_metadata.TensorProperties,
    dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata, dcp_metadata.ChunkStorageMetadata,
    dcp_filesystem._StorageInfo)}
# Globals that are values, never called: the dtypes a tensor in a checkpoint may have.
_DTYPES = {("torch", str(dtype).split(".")[1]): dtype for dtype in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128)}


def _ints(values: Any) -> List[int]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int for v in values):
        raise MetadataRefused(f"a torch.Size of {type(values).__name__}, not of ints")
    return list(values)


def _one_arg(args: Tuple[Any, ...], kind: type, what: str) -> Any:
    if len(args) != 1 or type(args[0]) is not kind:
        raise MetadataRefused(f"{what} built from {args!r:.80}")
    return args[0]


def _path(args: Tuple[Any, ...]) -> pathlib.PurePath:
    if not all(type(a) is str for a in args):
        raise MetadataRefused("a path built from something other than strings")
    return pathlib.Path(*args)


def _empty_ordered_dict(args: Tuple[Any, ...]) -> Dict[Any, Any]:
    if args:
        raise MetadataRefused("an OrderedDict built from arguments")
    return collections.OrderedDict()


# What a REDUCE may construct, by the global it names: each checks its arguments.
_CONSTRUCTORS: Dict[Tuple[str, str], Callable[[Tuple[Any, ...]], Any]] = {
    ("torch", "Size"): lambda args: torch.Size(_ints(_one_arg(args, tuple, "a torch.Size"))),
    ("torch.serialization", "_get_layout"):
        lambda args: torch.serialization._get_layout(_one_arg(args, str, "a layout")),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"):
        lambda args: dcp_metadata._MEM_FORMAT_ENCODING(_one_arg(args, int, "a memory format")),
    ("pathlib", "PosixPath"): _path,
    ("pathlib", "WindowsPath"): _path,  # written on Windows; read here as a path of the same parts
    ("pathlib", "Path"): _path,
    ("collections", "OrderedDict"): _empty_ordered_dict,
}


@dataclasses.dataclass(frozen=True)
class _Global:
    """A global the stream named: only ever looked up in the tables above, never imported."""
    module: str
    name: str


class _Mark:
    pass


_MARK = _Mark()


def _build(instance: Any, state: Any) -> None:
    """Fill a fresh dataclass instance from its pickled state: its own fields only, each once."""
    cls = type(instance)
    if cls is dcp_metadata.TensorProperties:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[0], torch.dtype)
                and isinstance(state[1], torch.layout) and isinstance(state[3], dcp_metadata._MEM_FORMAT_ENCODING)
                and type(state[2]) is bool and type(state[4]) is bool):
            raise MetadataRefused("TensorProperties state is not (dtype, layout, bool, memory format, bool)")
        cls.__setstate__(instance, state)  # DCP's own: maps the memory-format enum back to torch's value
        return
    if state is None:
        state = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(state, dict) or not all(type(key) is str and key in fields for key in state):
        raise MetadataRefused(f"{cls.__name__} state holds keys other than its fields "
                              f"({sorted(map(str, state))[:5] if isinstance(state, dict) else type(state).__name__})")
    values = {}
    for name, field in fields.items():
        if name in state:
            values[name] = state[name]
        elif field.default is not dataclasses.MISSING:
            values[name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[name] = field.default_factory()
        else:
            raise MetadataRefused(f"{cls.__name__} state lacks {name!r}")
    instance.__dict__.update(values)  # what pickle's BUILD does, on this fresh instance only


def read_dcp_metadata(data: bytes) -> dcp_metadata.Metadata:
    """The `Metadata` a DCP `.metadata` pickle describes, rebuilt from plain values (module docstring)."""
    stack: List[Any] = []
    memo: Dict[int, Any] = {}
    unbuilt: Dict[int, Any] = {}  # id -> fresh NEWOBJ instance that no BUILD has filled yet

    def pop_mark() -> List[Any]:
        items = []
        while True:
            item = stack.pop()
            if item is _MARK:
                return items[::-1]
            items.append(item)

    for opcode, arg, _pos in pickletools.genops(data):
        name = opcode.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            break
        if name == "MARK":
            stack.append(_MARK)
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINBYTES", "BINBYTES",
                      "BINBYTES8", "BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT",
                      "FLOAT"):
            stack.append(arg)
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name in ("EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT"):
            stack.append({"EMPTY_TUPLE": (), "EMPTY_LIST": [], "EMPTY_DICT": {}}[name])
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = tuple(stack[-count:])
            del stack[-count:]
            stack.append(items)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name == "LIST":
            stack.append(pop_mark())
        elif name in ("DICT", "SETITEMS"):
            items = pop_mark()
            target = {} if name == "DICT" else stack[-1]
            if not isinstance(target, dict) or len(items) % 2:
                raise MetadataRefused(f"{name} onto a {type(target).__name__}")
            for key, value in zip(items[::2], items[1::2]):
                target[key] = value
            if name == "DICT":
                stack.append(target)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            if not isinstance(stack[-1], dict):
                raise MetadataRefused(f"SETITEM onto a {type(stack[-1]).__name__}")
            stack[-1][key] = value
        elif name in ("APPEND", "APPENDS"):
            items = [stack.pop()] if name == "APPEND" else pop_mark()
            if type(stack[-1]) is not list:
                raise MetadataRefused(f"{name} onto a {type(stack[-1]).__name__}")
            stack[-1].extend(items)
        elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[int(arg)])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
            else:
                attr, module = stack.pop(), stack.pop()
            key = (module, attr)
            if key in _DTYPES:
                stack.append(_DTYPES[key])
            elif key in _DATACLASSES or key in _CONSTRUCTORS:
                stack.append(_Global(*key))
            else:
                raise MetadataRefused(f"unsupported global {str(module)[:80]}.{str(attr)[:80]}")
        elif name == "NEWOBJ":
            args, cls = stack.pop(), stack.pop()
            if not (isinstance(cls, _Global) and (cls.module, cls.name) in _DATACLASSES) or args != ():
                raise MetadataRefused(f"NEWOBJ of {cls!r:.80}")
            instance = object.__new__(_DATACLASSES[(cls.module, cls.name)])
            unbuilt[id(instance)] = instance
            stack.append(instance)
        elif name == "REDUCE":
            args, func = stack.pop(), stack.pop()
            if not (isinstance(func, _Global) and (func.module, func.name) in _CONSTRUCTORS) \
                    or not isinstance(args, tuple):
                raise MetadataRefused(f"REDUCE of {func!r:.80}")
            stack.append(_CONSTRUCTORS[(func.module, func.name)](args))
        elif name == "BUILD":
            state = stack.pop()
            instance = unbuilt.pop(id(stack[-1]), None)
            if instance is None or instance is not stack[-1]:
                raise MetadataRefused(f"BUILD onto {type(stack[-1]).__name__}, not onto a fresh DCP metadata record")
            _build(instance, state)
        else:
            raise MetadataRefused(f"unsupported pickle opcode {name}")
    else:
        raise MetadataRefused("no STOP opcode: the file ends early")
    for instance in unbuilt.values():  # pickle writes no BUILD for a record without state (BytesStorageMetadata)
        _build(instance, None)
    if len(stack) != 1 or not isinstance(stack[0], dcp_metadata.Metadata):
        raise MetadataRefused("it does not describe one DCP Metadata record")
    return stack[0]
