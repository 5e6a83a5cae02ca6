"""What every command shares: the app, errors, and options derived from the config dataclasses.

The options of `extract`, `train`, `probe`, `demo` and the decoders are derived from their dataclasses (field
name -> --kebab-case flag, type, default and help), so every default and help string lives in one place
(hff_cache/config.py, FusionConfig, DemoConfig, DecoderConfig); `Flag` records where a command line differs
from a field.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import typer

from hff_cache.config import (
    parse_layers,
    parse_option_value,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Extract a frozen speech encoder once into a Zarr feature cache; train layer fusion "
                       "and task heads from it.")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _key_value(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{option} takes KEY=VALUE, not {text!r}")
    return key.strip(), value


def _storage_options(values: list[str]) -> dict:
    opts: dict = {}
    for kv in values:
        key, _, value = kv.partition("=")
        opts[key] = parse_option_value(value)  # JSON values (numbers, true/false, objects), else a string
    return opts


_FROM_FIELD: Any = object()  # Flag.default: the field's own default


# NamedTuples, not dataclasses: `typer ... utils docs` loads this module outside sys.modules, where a dataclass
# with string annotations cannot be built.
class Flag(NamedTuple):
    """How a config field appears on a command line where that differs from the plain derivation."""

    decls: tuple[str, ...] = ()  # option names (default: --kebab-case of the field name)
    cli_type: Any = None  # what is typed, when it is not the field's type; `parse` turns it into the field's
    parse: Callable[[Any], Any] | None = None
    default: Any = _FROM_FIELD  # the command's own default (... = required)
    help: str | None = None  # the command's own help (default: the field's metadata["help"])
    hidden: bool = False


class ConfigOption(NamedTuple):
    """One typer option and the config key its value goes to (("epochs",) or ("fusion", "width"))."""

    key: tuple[str, ...]
    parameter: inspect.Parameter
    parse: Callable[[Any], Any]


def config_options(cls: type, flags: Mapping[str, Flag] | None = None, only: Sequence[str] | None = None,
                   within: tuple[str, ...] = ()) -> list[ConfigOption]:
    """One option per field of ``cls`` in field order, a nested config's fields included (fusion.width is
    --width); ``flags`` and ``only`` name fields by dotted key."""
    flags = flags or {}
    hints = typing.get_type_hints(cls)
    options: list[ConfigOption] = []
    for f in dataclasses.fields(cls):
        key = (*within, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            options += config_options(hints[f.name], flags, only, key)
        elif only is None or ".".join(key) in only:
            options.append(_config_option(f, hints[f.name], key, flags.get(".".join(key), Flag())))
    return options


def _config_option(f: dataclasses.Field, hint: Any, key: tuple[str, ...], flag: Flag) -> ConfigOption:
    decls = flag.decls
    if not decls and len(key) > 1:  # a nested field keeps its own name: --width, --layer-norm/--no-layer-norm
        kebab = key[-1].replace("_", "-")
        decls = (f"--{kebab}/--no-{kebab}",) if hint is bool else (f"--{kebab}",)
    default = flag.default
    if default is _FROM_FIELD:
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...  # a required field
        if flag.parse is not None and default not in (None, ...) and not isinstance(default, str):
            default = str(default)  # typed as text: --in-memory auto, --rung-gate-init 0.1
    info = typer.Option(default, *decls, help=flag.help or f.metadata.get("help", ""), hidden=flag.hidden)
    parameter = inspect.Parameter("_".join(key), inspect.Parameter.KEYWORD_ONLY, default=info,
                                  annotation=flag.cli_type or hint)
    return ConfigOption(key, parameter, flag.parse or (lambda value: value))


def with_options(*groups: Sequence[ConfigOption]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command (which takes them as ``**options``) the options of ``groups`` after its own: typer reads
    a command's options from its signature."""
    def install(command: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(command).parameters.values() if p.kind is not p.VAR_KEYWORD]
        derived = [o.parameter for g in groups for o in g]
        command.__signature__ = inspect.Signature([*own, *derived])  # type: ignore[attr-defined]
        return command
    return install


def config_values(options: Sequence[ConfigOption], values: Mapping[str, Any],
                  given_in: typer.Context | None = None) -> dict[str, Any]:
    """The settings of a command's option values, nested by key ({"fusion": {"width": 512}}). With ``given_in``
    only the options typed on that command line: defaults come from the config (or a config file)."""
    settings: dict[str, Any] = {}
    for opt in options:
        name = opt.parameter.name
        if given_in is not None and _source(given_in, name) in ("DEFAULT", "DEFAULT_MAP", None):
            continue
        *parents, last = opt.key
        target = settings
        for k in parents:
            target = target.setdefault(k, {})
        target[last] = opt.parse(values[name])
    return settings


def _source(ctx: typer.Context, name: str) -> str | None:
    # by name: typer vendors click, and its ParameterSource enum sits in a private module
    source = ctx.get_parameter_source(name)
    return None if source is None else source.name


def _gate_init(text: str | None) -> float | None:
    return None if text is None or text.strip().lower() == "none" else float(text)


_LAYERS = Flag(cli_type=str | None, parse=parse_layers)  # 'all', '0,3,6', '0-4,8'


_STORAGE = Flag(decls=("--storage-option",), cli_type=list[str], parse=_storage_options, default=[])


_OUT, _MODEL, _DATA = Flag(decls=("--out", "-o")), Flag(decls=("--model", "-m")), Flag(decls=("--data", "-d"))


def _train_errors() -> tuple[type[Exception], ...]:
    from hff_cache.cache import CacheFormatError
    from hff_cache.runs.directory import RunError
    from hff_cache.tasks.task import LabelError

    return (RunError, LabelError, CacheFormatError, FileNotFoundError, ValueError)
