"""Named merge recipes: an operator's file of name -> MergeSpec, served by name on every API.

The file is YAML or JSON (YAML is a superset): a mapping from recipe name to a merge spec written
as MergeSpec's protobuf JSON (field names as in the .proto, enums by name), for example::

    facts-upper:
      adapters: [{id: facts, weight: 1.2}, {id: upper, weight: 1.0}]
      merge_strategy: LINEAR
    careful-ties: {ids: [a, b], weights: [0.6, 0.4], merge_strategy: TIES, density: 0.7}

Everything is checked at start-up, so a bad recipe stops the service with one line naming the
recipe and the field, not the first request that uses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from google.protobuf import json_format

from inference_service.request_specs import describe_spec, normalize_spec
from loramerge.errors import InvalidArgument, NotFound, shown
from loramerge.v1 import merge_pb2

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Density is a fraction of values kept: strategies other than linear need it (never silently 0).
_NEEDS_DENSITY = frozenset(
    v.number for v in merge_pb2.MergeStrategy.DESCRIPTOR.values if v.name not in ("LINEAR",)
) - {merge_pb2.MergeStrategy.MERGE_STRATEGY_UNSPECIFIED}


class RecipeError(ValueError):
    """A recipe file that cannot be served; the message is one line naming recipe and field."""


@dataclass(frozen=True)
class Recipe:
    name: str
    spec: merge_pb2.MergeSpec  # as written (normalised per request, like any spec)
    description: str


def check_density(spec: merge_pb2.MergeSpec, field_prefix: str) -> None:
    """Strategies other than linear need a density in (0, 1]: a missing one is an error, never 0."""
    if spec.merge_strategy in _NEEDS_DENSITY:
        name = merge_pb2.MergeStrategy.Name(spec.merge_strategy)
        if not spec.HasField("density"):
            raise InvalidArgument(
                f"{field_prefix}.density is required for merge_strategy {name}, got none",
                field=f"{field_prefix}.density",
            )
        if not 0 < spec.density <= 1:
            raise InvalidArgument(
                f"{field_prefix}.density must be in (0, 1] for merge_strategy {name}, got {spec.density:g}",
                field=f"{field_prefix}.density",
            )


def parse_recipe(name: str, body: object) -> Recipe:
    """One recipe from its decoded JSON/YAML value; InvalidArgument names the field."""
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidArgument(
            f"recipe names are 1-128 letters, digits, '.', '_', ':' or '-', got {shown(name)}", field="name"
        )
    if not isinstance(body, dict):
        raise InvalidArgument(
            f"must be a mapping of MergeSpec fields, got {type(body).__name__}", field="spec"
        )
    spec = merge_pb2.MergeSpec()
    try:
        json_format.ParseDict(body, spec)
    except json_format.ParseError as e:
        raise InvalidArgument(shown(str(e), 200, quote=False), field="spec") from None
    normalize_spec(spec, engine_max_rank=1 << 30)  # same checks as a request's spec
    check_density(spec, "spec")
    return Recipe(name=name, spec=spec, description=describe_spec(spec))


def load_recipes(path: Path | None) -> dict[str, Recipe]:
    """The recipes of ``path`` (none for None); RecipeError with one line on any fault."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RecipeError(f"--recipes {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"--recipes {path}: not YAML or JSON: {shown(str(e), 200, quote=False)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"--recipes {path}: must map recipe names to merge specs, got {type(data).__name__}"
        )
    recipes: dict[str, Recipe] = {}
    for name, body in data.items():
        try:
            recipes[name] = parse_recipe(name, body)
        except InvalidArgument as e:
            message = e.message.replace("merged_adapters", "spec")
            if not message.startswith(("spec", "recipe")):
                message = f"{e.field or 'spec'}: {message}"
            raise RecipeError(f"--recipes {path}: recipe {shown(name)}: {message}") from None
    return recipes


class RecipeBook:
    """The recipes a service was started with, looked up by name."""

    def __init__(self, recipes: dict[str, Recipe] | None = None) -> None:
        self._recipes = dict(recipes or {})

    def __iter__(self):
        return iter(self._recipes.values())

    def __contains__(self, name: str) -> bool:
        return name in self._recipes

    def get(self, name: str, field: str = "recipe") -> Recipe:
        recipe = self._recipes.get(name)
        if recipe is None:
            known = ", ".join(sorted(self._recipes)) or "none"
            raise NotFound(
                f"{field}: no recipe named {shown(name)} (known: {shown(known, quote=False)})", field=field
            )
        return recipe
