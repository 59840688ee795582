"""Model cards: names for published models (where to download them, their checksum, shape, tokenizer).

Built-in cards ship in this folder (`*.yaml`). Users add their own, or override a built-in one, in
`$XDG_CONFIG_HOME/tramontane/cards/*.yaml` (default `~/.config/tramontane/cards/`): a card called
`NAME@user` wins over the built-in `NAME`, its fields replacing those they name (as fairseq2's asset
cards do). Each file holds a list of cards:

    - name: my-model
      url: https://example.org/my-model.tar
      md5: 0123456789abcdef0123456789abcdef
      format: tar                  # a tar of a model folder, or `file` for one file (a .gguf)
      tokenizer: tokenizer.model.v3

Example:
    >>> find_card("mistral-7b-instruct-v0.3").md5
    '80b71fcb6416085bcb4efad86dfb4d52'
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..args import PRESETS
from ..errors import ConfigError

BUILTIN = Path(__file__).parent
USER_SUFFIX = "@user"
FORMATS = ("tar", "file")


@dataclass(frozen=True)
class Card:
    """One named model: where its weights come from and how to check them."""

    name: str
    url: str
    format: str = "tar"
    md5: str | None = None
    sha256: str | None = None
    preset: str | None = None
    tokenizer: str | None = None
    hf_repo: str | None = None
    aliases: tuple[str, ...] = ()  # other names, e.g. fairseq2's `mistral_7b`
    source: str = ""  # the file the card came from

    def check(self) -> None:
        where = f"{self.source} (card {self.name!r})"
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(where, "name must be a plain name (no '/', not starting with '.')")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(where, f"url must be http(s), got {self.url!r}")
        if self.format not in FORMATS:
            raise ConfigError(where, f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.md5 is None and self.sha256 is None:
            raise ConfigError(where, "needs an md5 or sha256 checksum: downloads are verified before use")
        for field, length in (("md5", 32), ("sha256", 64)):
            value = getattr(self, field)
            if value is not None and (len(value) != length or any(c not in "0123456789abcdef" for c in value)):
                raise ConfigError(where, f"{field} must be {length} lowercase hex digits, got {value!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(where, f"preset {self.preset!r} is not one of {', '.join(PRESETS)}")


def user_card_dir() -> Path:
    """Where user cards live: $XDG_CONFIG_HOME/tramontane/cards (default ~/.config/tramontane/cards)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "tramontane" / "cards"


def load_cards(user_dir: Path | None = None) -> dict[str, Card]:
    """Every card by name, user overrides applied. A user card may not reuse a built-in name without
    the `@user` suffix (so that an override is always deliberate).

    Raises:
        ConfigError: a card file is not valid YAML, a card lacks a field or holds a bad value, two
            cards share a name, or an `@user` card overrides no built-in card.
    """
    builtin = _read_dir(BUILTIN)
    user = _read_dir(user_card_dir() if user_dir is None else user_dir)
    cards = {name: _card(fields) for name, fields in builtin.items()}
    for name, fields in user.items():
        if name.endswith(USER_SUFFIX):
            base = name.removesuffix(USER_SUFFIX)
            if base not in builtin:
                raise ConfigError(fields["source"], f"card {name!r} overrides {base!r}, which is no built-in card")
            cards[base] = _card({**builtin[base], **fields, "name": base})
        elif name in builtin:
            raise ConfigError(fields["source"], f"card {name!r} is a built-in name: call it {name}{USER_SUFFIX} to override it")
        else:
            cards[name] = _card(fields)
    return cards


def find_card(name: str, user_dir: Path | None = None) -> Card:
    """The card called `name` (or `name@user`, the same thing once overrides are applied).

    Raises:
        KeyError: no card has that name; the message lists the known ones.
    """
    cards = load_cards(user_dir)
    base = name.removesuffix(USER_SUFFIX)
    card = cards.get(base) or next((c for c in cards.values() if base in c.aliases), None)
    if card is None:
        raise KeyError(f"no model card named {name!r}; known: {', '.join(sorted(cards))}")
    return card


def _read_dir(folder: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for file in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or []
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(file, f"cannot read card file: {e}") from e
        if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
            raise ConfigError(file, "a card file holds a list of cards (mappings with name, url, ...)")
        for fields in data:
            name = fields.get("name")
            if not isinstance(name, str):
                raise ConfigError(file, f"a card without a name: {fields!r}")
            if name in out:
                raise ConfigError(file, f"card {name!r} is also defined in {out[name]['source']}")
            out[name] = {**fields, "source": str(file)}
    return out


def _card(fields: dict[str, Any]) -> Card:
    known = {f.name for f in dataclasses.fields(Card)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(fields["source"], f"card {fields['name']!r}: unknown field(s) {', '.join(unknown)}")
    if "url" not in fields:
        raise ConfigError(fields["source"], f"card {fields['name']!r}: missing required field url")
    values: dict[str, Any] = {k: (str(v) if k in ("md5", "sha256") and v is not None else v)
                              for k, v in fields.items()}
    if not isinstance(values.get("aliases", []), list | tuple):
        raise ConfigError(fields["source"], f"card {fields['name']!r}: aliases must be a list of names")
    values["aliases"] = tuple(values.get("aliases", ()))
    card = Card(**values)
    card.check()
    return card
