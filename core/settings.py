"""The one configuration mechanism of every component: naming rule, environment reading, error format.

A component's config is a dataclass (named defaults, `validate()` at start-up) that derives from `Settings`
and declares its fields with `setting()`: what the field does, the form its variable accepts, older names.
Every field has one environment variable, named by one rule:

    GRADWATCH_<COMPONENT>_<FIELD>   e.g. GRADWATCH_AGGREGATOR_LEASE_TTL_MS, GRADWATCH_AGENT_EVERY
    GRADWATCH_<FIELD>               the SHARED settings only, one name for every component that has them

Names from before the rule stay as aliases, read when the canonical variable is unset. Precedence:
defaults < environment < explicit values (keyword arguments, CLI flags); an empty variable counts as unset.
pydantic-settings reads the variables (AliasChoices: canonical name first) and parses them; a value that
does not parse or has the wrong form raises ConfigError naming the variable and the form it accepts, so a
process stops at start instead of running on a default (the agent: at watch(), never mid-run). pydantic
is imported only when a variable is set, which keeps `import gradwatch` and the agent light.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from typing import Any, ClassVar, Self, TypeVar, get_type_hints
from urllib.parse import urlsplit

S = TypeVar("S")
PREFIX = "GRADWATCH_"
# Settings of something the components share (an address, a credential, the Redis): one name for all.
SHARED = frozenset({"collector", "token", "redis_url", "redis_cluster", "alertmanager_url"})


class ConfigError(ValueError):
    """A configuration value is invalid; raised at start-up (reading the environment, or validate())."""


def env_var(component: str, name: str) -> str:
    """The environment variable of field `name` of `component`: the naming rule."""
    if name in SHARED:
        return f"{PREFIX}{name.upper()}"
    return f"{PREFIX}{component.upper()}_{name.upper()}"


@dataclass(frozen=True)
class Form:
    """What a variable accepts: `text` for people (errors, the README), the rest checked by `accepts()`."""

    text: str
    type: type = str                    # what pydantic parses the string as: int, float, bool or str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    finite: bool = False                # nan and inf refused
    choices: tuple[str, ...] = ()
    check: Callable[[str], None] | None = None  # raises ValueError(why) for a string of the wrong shape

    def accepts(self, value: Any) -> bool:
        """Whether a parsed value is within the bounds and choices (shape checks raise instead)."""
        if self.type is float and self.finite and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (not self.choices or value in self.choices))


def _bounds(ge: float | None, gt: float | None, le: float | None) -> str:
    parts = [f">= {ge:g}" if ge is not None else "", f"> {gt:g}" if gt is not None else "",
             f"<= {le:g}" if le is not None else ""]
    return " and ".join(p for p in parts if p)


def integer(*, ge: int | None = None, gt: int | None = None, le: int | None = None) -> Form:
    return Form(f"integer {_bounds(ge, gt, le)}".strip(), int, ge, gt, le)


def number(*, ge: float | None = None, gt: float | None = None, le: float | None = None, inf: bool = False) -> Form:
    """A float; `inf=True` also accepts inf (e.g. "no limit")."""
    text = f"number {_bounds(ge, gt, le)}".strip() + (", or inf" if inf else "")
    return Form(text, float, ge, gt, le, finite=not inf)


def choice(*values: str) -> Form:
    return Form(f"one of {', '.join(values)}", choices=values)


def host_port(example: str, *, empty: str = "") -> Form:
    return Form(f"host:port, e.g. {example}" + (f"; '' {empty}" if empty else ""), check=_host_port)


def url(*schemes: str, example: str) -> Form:
    return Form(f"{', '.join(s + '://' for s in schemes)} URL, e.g. {example}", check=lambda v: _url(v, schemes))


def spec(text: str, parser: Callable[[], Callable[[str], object]]) -> Form:
    """A spec string, checked by the parser `parser()` returns (imported late: it may be heavy)."""

    def check(value: str) -> None:
        parser()(value)  # raises ValueError saying what is wrong

    return Form(text, check=check)


def _host_port(value: str) -> None:
    _, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("no port" if not sep else f"bad port {port!r}")


def _url(value: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.scheme not in ("http", "https")):
        raise ValueError("wrong scheme" if parts.scheme not in schemes else "no host")


def loopback_only(host: str) -> bool:
    """Whether a listener on `host` is reachable from this machine only: every address the host names is a
    loopback address (127.0.0.0/8, ::1; "localhost" resolves to them). The wildcard ('', 0.0.0.0, ::), any
    other address and a name that does not resolve are not. The start-up rule of every listener that
    serves data (docs/security.md): beyond loopback, a token is required."""
    host = host.strip("[]")
    if not host:
        return False
    try:
        addresses = {ipaddress.ip_address(host.split("%", 1)[0])}
    except ValueError:
        try:
            addresses = {ipaddress.ip_address(info[4][0].split("%", 1)[0])
                         for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
        except (OSError, ValueError):
            return False
    mapped = {getattr(a, "ipv4_mapped", None) or a for a in addresses}  # ::ffff:127.0.0.1 is loopback too
    return bool(mapped) and all(a.is_loopback for a in mapped)


def _file(path: str) -> None:
    if not os.path.exists(path):
        raise ValueError("no such file")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError("not a file" if not os.path.isfile(path) else "not readable")


def _directory(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError("exists and is not a directory")


BOOLEAN = Form("1/0, true/false, yes/no, on/off", bool)
TEXT = Form("text")
SECRET = Form("token: printable ASCII, no spaces")
FILE = Form("path of a readable file", check=_file)
DIRECTORY = Form("directory (created if missing)", check=_directory)


@dataclass(frozen=True)
class Setting:
    """A config field's documentation and environment: `setting()` puts one in the field's metadata."""

    doc: str                            # what it does, for the README table
    form: Form | None = None            # None: from the field's type (int, float, bool, str)
    aliases: tuple[str, ...] = ()       # older variable names, still read after the canonical one
    flag: str = ""                      # the CLI flag or keyword argument that overrides the variable
    secret: bool = False                # kept out of repr and of error messages
    shown: str = ""                     # the default as the README shows it, when the value itself is not telling
    empty: bool = False                 # '' is a value (e.g. "disabled"), not "unset"
    unset: tuple[str, ...] = ()         # values that count as unset too (torchrun's run id "none")


def setting(default: Any = MISSING, doc: str = "", *, default_factory: Any = MISSING, form: Form | None = None,
            aliases: Collection[str] = (), flag: str = "", secret: bool = False, shown: str = "",
            empty: bool = False, unset: Collection[str] = ()) -> Any:
    """A dataclass field with its Setting; secrets are left out of repr."""
    meta = Setting(doc, form, tuple(aliases), flag, secret, shown, empty, tuple(unset))
    return field(default=default, default_factory=default_factory, repr=not secret, metadata={"setting": meta})


@dataclass(frozen=True)
class Variable:
    """One field's environment variable(s), as the README table and the error messages show them."""

    component: str
    field: str
    names: tuple[str, ...]              # the canonical name, then the aliases
    setting: Setting
    form: Form
    default: Any                        # MISSING when a factory makes it

    @property
    def name(self) -> str:
        return self.names[0]


_TYPE_FORMS = {"bool": BOOLEAN, "int": integer(), "float": number(inf=True), "str": TEXT}


@cache
def variables(cls: type) -> tuple[Variable, ...]:
    """Every field of the Settings dataclass `cls` with its variables, in field order."""
    hints = get_type_hints(cls)
    out = []
    for f in fields(cls):
        meta: Setting = f.metadata.get("setting") or Setting("")
        kind = next(t for t in (bool, int, float, str) if t in (hints[f.name], *getattr(hints[f.name], "__args__", ())))
        form = meta.form or (SECRET if meta.secret else _TYPE_FORMS[kind.__name__])
        out.append(Variable(cls.COMPONENT, f.name, (env_var(cls.COMPONENT, f.name), *meta.aliases), meta, form,
                            f.default))
    return tuple(out)


class Settings:
    """Base of the component configs (dataclasses): the environment, read by the naming rule."""

    COMPONENT: ClassVar[str]

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Defaults, then the environment, then the explicit (non-None) overrides; a bad variable raises
        ConfigError. The variable of an overridden field is not read, so a flag can mend a bad one."""
        return load(cls, {key: value for key, value in overrides.items() if value is not None})

    @classmethod
    def env_name(cls, field_name: str) -> str:
        return env_var(cls.COMPONENT, field_name)


def load(cls: type[S], overrides: Mapping[str, Any] | None = None) -> S:
    """`cls` from its defaults, the environment, then `overrides` (None values included)."""
    overrides = dict(overrides or {})
    return cls(**{**read_env(cls, skip=overrides.keys()), **overrides})


def given_flags(cls: type, args: Any) -> dict[str, Any]:
    """The fields of `cls` whose CLI flag (Setting.flag, `--name` -> args.name) was given: not None."""
    values = {v.field: getattr(args, v.setting.flag[2:].replace("-", "_"), None) for v in variables(cls)
              if v.setting.flag.startswith("--")}
    return {name: value for name, value in values.items() if value is not None}


def read_env(cls: type, skip: Collection[str] = ()) -> dict[str, Any]:
    """The fields of `cls` that the environment sets, parsed and checked; ConfigError names each bad variable."""
    wanted = tuple(v for v in variables(cls) if v.field not in skip)
    if not any(name in os.environ for v in wanted for name in v.names):
        return {}  # nothing to read: pydantic stays unimported
    from pydantic import ValidationError

    try:
        parsed = _model(cls, tuple(v.field for v in wanted))()
    except ValidationError as err:
        by_name = {name: v for v in wanted for name in (v.field, *v.names)}
        problems = [_problem(by_name[e["loc"][0]], e) for e in err.errors() if e["loc"] and e["loc"][0] in by_name]
        raise ConfigError("; ".join(problems) or str(err)) from None
    values = {}
    for v in wanted:
        if v.field in parsed.model_fields_set and getattr(parsed, v.field) not in v.setting.unset:
            values[v.field] = getattr(parsed, v.field)
        elif v.setting.empty and any(os.environ.get(name) == "" for name in v.names):
            values[v.field] = ""
    return values


def _problem(v: Variable, error: Mapping[str, Any]) -> str:
    """"GRADWATCH_X='abc': expected <form>", naming the variable that was read (the first one set)."""
    name = next((n for n in v.names if os.environ.get(n)), v.name)
    shown = "<hidden>" if v.setting.secret else repr(_redacted(os.environ.get(name, "")))
    why = str(error.get("ctx", {}).get("error", "")) if error.get("type") == "value_error" else ""
    alias = f", an alias of {v.name}" if name != v.name else ""
    return f"invalid {name}={shown}{alias}: expected {v.form.text}" + (f" ({why})" if why else "")


def _redacted(value: str) -> str:
    """A URL's password replaced by ***: error messages end up in logs."""
    try:
        parts = urlsplit(value)
        if parts.password is None:
            return value
    except ValueError:
        return value
    return value.replace(f":{parts.password}@", ":***@", 1)


@cache
def _model(cls: type, names: tuple[str, ...]) -> type:
    """A pydantic-settings class reading `cls`'s fields `names` from their variables (all optional)."""
    from pydantic import AliasChoices, Field, create_model
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class Environment(BaseSettings):
        # Case-sensitive like os.environ; no .env file: the process environment only.
        model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, extra="ignore",
                                          validate_default=False)  # None: not set

    declared = {v.field: (_annotation(v.form), Field(None, validation_alias=AliasChoices(*v.names)))
                for v in variables(cls) if v.field in names}
    return create_model(f"{cls.__name__}Environment", __base__=Environment, **declared)


def _annotation(form: Form) -> Any:
    from typing import Annotated, Literal

    from pydantic import AfterValidator, BeforeValidator

    def checked(value: Any) -> Any:
        if form.check is not None:
            form.check(value)
        if not form.accepts(value):
            raise ValueError("")  # the form's text says it all
        return value

    base = Literal[form.choices] if form.choices else form.type
    strip = [BeforeValidator(lambda v: v.strip() if isinstance(v, str) else v)] if form.type is not str else []
    return Annotated[(base, *strip, AfterValidator(checked))]
