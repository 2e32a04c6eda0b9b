"""The config fields in ``tempflow train --help``: one argparse argument group per concern
(:data:`~tempflow.config.FIELD_GROUPS`), each field once, with its help text and default.

Only the help is built here; recipes and ``--field value`` overrides are parsed by
:func:`~tempflow.config.parse_config`, which also takes the dashed spellings (``--output-dir``) and
``--no_FIELD`` for a boolean that defaults to true: :data:`SYNTAX` says so once, instead of every field
repeating it."""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import MISSING, Field, fields

from .config import FIELD_GROUPS, TempFlowGRPOConfig

SYNTAX = ("Any config field can be set in the recipe or overridden as --field value, with underscores or "
          "dashes (--output_dir, --output-dir). Booleans: --field, --field true|false, and --no_field for "
          "those that default to true; lists: --field a b c; mappings: JSON, e.g. --reward_kwargs "
          "'{\"pickscore\": {\"normalize\": true}}'.")
_METAVARS = {int: "N", float: "X", str: "TEXT", dict: "JSON"}


class FieldHelpFormatter(argparse.HelpFormatter):
    """Each option on a line of its own with its default (``--lora_r N = 32``) and its help beneath,
    indented: the terminal's whole width for the text, and no line spent on a default alone."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=8)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        invocation = super()._format_action_invocation(action)
        return f"{invocation} = {action.default}" if isinstance(action.default, _Shown) else invocation


class _Shown(str):
    """A field's default as the help shows it (YAML's spelling)."""


def add_config_groups(parser: argparse.ArgumentParser) -> None:
    """Add every config field to ``parser`` under its group's title, for printing the help (with
    :class:`FieldHelpFormatter`)."""
    by_name = {f.name: f for f in fields(TempFlowGRPOConfig)}
    hints = typing.get_type_hints(TempFlowGRPOConfig)
    for title, holds, names in FIELD_GROUPS:
        group = parser.add_argument_group(title, holds[:1].upper() + holds[1:] + ".")
        for name in names:
            field, hint = by_name[name], _without_none(hints[name])
            text = field.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help texts
            shown = dict(default=_shown_default(field), help=text)
            if hint is bool:
                group.add_argument(f"--{name}", nargs="?", metavar="true|false", **shown)
            elif typing.get_origin(hint) is list:
                item = typing.get_args(hint)[0]
                group.add_argument(f"--{name}", nargs="+", metavar=_METAVARS.get(item, "TEXT"), **shown)
            else:
                group.add_argument(f"--{name}", metavar=_METAVARS.get(hint, "JSON"), **shown)


def _without_none(hint):
    """``int | None`` → ``int``; ``dict | str | None`` → ``dict`` (a mapping, JSON on the command line)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return dict if dict in args else args[0]
    return hint


def _shown_default(f: Field) -> _Shown | None:
    """The default in YAML's spelling (``true``, ``null``, ``[8, 8]``); None where the help text itself says
    what happens when the field is unset."""
    default = f.default_factory() if f.default is MISSING else f.default
    if default is None and "default" in f.metadata.get("help", "").lower():
        return None
    if default is None or isinstance(default, bool):
        return _Shown(json.dumps(default))
    if isinstance(default, list):
        return _Shown(f"[{', '.join(map(str, default))}]")
    return _Shown(default)
