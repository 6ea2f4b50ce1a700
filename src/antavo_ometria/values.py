"""Plain value helpers every layer shares: dot paths into nested records, and names given in several languages."""

from __future__ import annotations


def walk(record: object, path: str) -> object:
    """The value at a dot path (`tiers.basic_structure.name`), or None where the path does not lead."""
    for part in path.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def translated(names: dict, language: str) -> object:
    """A name given per language ({"en": "Gold", "de": "Gold"}): the configured language's, else the first."""
    return names.get(language) or next(iter(names.values()), None)


def is_translation(value: object) -> bool:
    """A non-empty object whose values are all text: a name given per language."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, str) for v in value.values())
