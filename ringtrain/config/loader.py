"""Typed configuration: one dataclass per component, composed into TrainConfig, loaded with fixed precedence.

Precedence: dataclass defaults < YAML file < command-line `section.key=value` overrides. Every problem
(unknown key, wrong type, bad value, inconsistent sizes) is collected first and raised together as a
ConfigError whose lines each name the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ringtrain.config.checkpoint import CheckpointConfig
from ringtrain.config.data import DataConfig
from ringtrain.config.eval import EvalConfig
from ringtrain.config.logging import LoggingConfig
from ringtrain.config.model import ModelConfig
from ringtrain.config.optim import OptimConfig
from ringtrain.config.parallel import ParallelConfig
from ringtrain.config.peft import AdapterConfig
from ringtrain.config.rope import RopeConfig
from ringtrain.config.train import TrainLoopConfig, objective_problems, resolve_objective_format
from ringtrain.errors import ConfigError


@dataclass
class TrainConfig:
    """Everything a run needs: one section per component, each documented field by field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    peft: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def _validate(self) -> list[tuple[str, str]]:
        """Checks across sections (each message names its full keys)."""
        return [("", p) for p in objective_problems(self.train, self.data)]


# --------------------------------------------------------------------------------------------------
# Generic dataclass <-> mapping machinery


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or null)"
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(arg)}"
    if origin is dict:
        return "a mapping"
    if tp is Any:
        return "any value"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """`value` converted to `tp`, or _NO. Strings from the command line are parsed as YAML scalars first."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            out = _coerce(value, arg)
            if out is not _NO:
                return out
        return _NO
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            value = parsed
        if not isinstance(value, (list, tuple)):
            return _NO
        items = [_coerce(v, arg) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                return _NO
        return dict(value) if isinstance(value, dict) else _NO
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        return _NO
    if tp is int:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    return _NO
                return int(f) if f.is_integer() else _NO
        return _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        return _NO
    return value


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if _is_dataclass_type(tp):
            keys.extend(_all_keys(tp, dotted + "."))
    return keys


def _unknown_key_message(cls: type, path: str, key: str, root: type) -> str:
    here = [f.name for f in dataclasses.fields(cls)]
    dotted = f"{path}{key}"
    close = difflib.get_close_matches(key, here, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{path}{close[0]}'?"
    else:
        # A known key in another section ("train.lr" for "optim.lr") is a common slip.
        leaves = [k for k in _all_keys(root) if k.rsplit(".", 1)[-1] == key]
        close_any = leaves or difflib.get_close_matches(dotted, _all_keys(root), n=1, cutoff=0.6)
        hint = f"did you mean '{close_any[0]}'?" if close_any else f"valid keys here: {', '.join(here)}"
    return f"unknown key '{dotted}': {hint}"


def _build(cls: type, data: dict, path: str, problems: list[str], root: type) -> Any:
    """Instantiate dataclass `cls` from `data`, appending every problem found to `problems`."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            problems.append(_unknown_key_message(cls, path, str(key), root))
            continue
        tp = hints[key]
        dotted = f"{path}{key}"
        if _is_dataclass_type(tp):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                problems.append(f"{dotted} must be a mapping of keys, got {value!r}")
                continue
            kwargs[key] = _build(tp, value, dotted + ".", problems, root)
            continue
        coerced = _coerce(value, tp)
        if coerced is _NO:
            problems.append(f"{dotted}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")
            continue
        kwargs[key] = coerced
    for name, f in fields.items():
        if name in kwargs:
            continue
        if _is_dataclass_type(hints[name]):
            # An absent section is built from defaults, so its own required keys are reported.
            kwargs[name] = _build(hints[name], {}, f"{path}{name}.", problems, root)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"missing required key '{path}{name}': set it in the YAML file or as {path}{name}=...")
    try:
        obj = cls(**kwargs)
    except TypeError:
        return None  # a required key is missing: already reported above
    return obj


def _validate_tree(obj: Any, path: str, problems: list[str]) -> None:
    """Run each section's `_validate()`, children first."""
    if obj is None:
        return
    complete = True
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _validate_tree(child, f"{path}{f.name}.", problems)
        elif child is None and _is_dataclass_type(_hints(type(obj))[f.name]):
            complete = False  # a section that could not be built: its problems are already reported
    check = getattr(obj, "_validate", None)
    if check is not None and complete:
        # Protocol: `_validate()` returns (key, message) pairs, the message starting with the key
        # relative to its section ("lr=-1 must be > 0"); the section path is prefixed here.
        for _key, message in check():
            problems.append(f"{path}{message}")


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str], problems: list[str]) -> list[tuple[str, Any]]:
    """`section.key=value` strings -> (dotted key, value). Values are YAML scalars ('3', 'true', 'null')."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p.isidentifier() for p in key.split(".")):
            problems.append(f"override {item!r} must look like section.key=value, e.g. optim.lr=3e-4")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def read_yaml(path: str | Path, problems: list[str]) -> dict:
    """The YAML mapping in `path`, or {} with a problem describing why it could not be read."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        problems.append(f"config file '{path}' does not exist: check the path")
        return {}
    except OSError as e:
        problems.append(f"config file '{path}' cannot be read: {e.strerror}")
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
        return {}
    return data


def parse_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
                 ) -> tuple[TrainConfig | None, list[str]]:
    """Defaults < YAML at `path` < `overrides`, with every structural and per-section problem found.

    Returns the config and the problems, one line each. Keys that were rejected keep their defaults, so a caller can
    go on checking values; a section missing a required key is None, and so is the config when the problems leave
    nothing to build. Checks that need the runtime (layouts, kernels, the model itself, the world size) are
    `ringtrain.validate`'s."""
    problems: list[str] = []
    data = read_yaml(path, problems) if path is not None else {}
    for key, value in parse_overrides(list(overrides), problems):
        _set_dotted(data, key, value)
    cfg = _build(TrainConfig, data, "", problems, TrainConfig)
    if cfg is not None and cfg.train is not None and cfg.data is not None:
        resolve_objective_format(cfg.train, cfg.data)
    _validate_tree(cfg, "", problems)
    return cfg, problems


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The config at `path` with `overrides`, or a ConfigError listing every structural problem. For a run, use
    `ringtrain.validate.load_validated_config`, which adds the checks that need the runtime."""
    cfg, problems = parse_config(path, overrides)
    if problems or cfg is None:
        raise ConfigError(problems or ["the config could not be built"])
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (the run's record of what it actually used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))
    return path


# --------------------------------------------------------------------------------------------------
# Reference documentation, generated from the dataclasses so it cannot drift from the code.


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal written right after it in the class body."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return yaml.safe_dump(f.default).strip().removesuffix("...").strip()
    if f.default_factory is not dataclasses.MISSING:
        return yaml.safe_dump(f.default_factory(), default_flow_style=True).strip()
    return "**required**"


def render_config_reference() -> str:
    """Markdown reference of every config key: type, default and meaning, section by section."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses by `python scripts/gen_config_docs.py`; a test fails when it is stale.",
        "Precedence: defaults < YAML file < command-line `section.key=value` overrides. Check a config with",
        "`ringtrain validate CONFIG [key=value ...] [--world-size N]`.",
        "",
    ]
    hints = _hints(TrainConfig)
    for section in dataclasses.fields(TrainConfig):
        cls = hints[section.name]
        docs = _field_docs(cls)
        lines += [f"## `{section.name}`", "", (cls.__doc__ or "").strip(), "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        field_hints = _hints(cls)
        for f in dataclasses.fields(cls):
            meaning = docs.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | {_type_name(field_hints[f.name])} | `{_default_text(f)}` "
                         f"| {meaning} |")
        lines.append("")
    return "\n".join(lines)
