"""YAML for study files, read strictly: a key written twice is an error, not "the last one wins".

PyYAML keeps the last of two equal keys without a word, so a study file with `n_trials: 60` and, further
down, `n_trials: 600` would silently run ten times the budget. Here it names both lines instead.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping with the same key twice; the message names the key path and both lines."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, tuple[int, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                first_line, first_value = seen[key]
                raise DuplicateKeyError(
                    f"{_path(self, node, key)}: written twice, {_shown(first_value)} on line {first_line} and "
                    f"{_shown(value_node)} on line {line} (YAML would silently keep the second)")
            seen[key] = line, value_node
        return super().construct_mapping(node, deep=deep)


def _shown(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return repr(node.value)
    return "{...}" if isinstance(node, yaml.MappingNode) else "[...]"


def _path(loader: _StrictLoader, node: yaml.MappingNode, key: Any) -> str:
    """`space.peak_lr_hidden.low`-style path of `key` inside `node`, found from the document's root."""
    def find(current: yaml.Node, target: yaml.Node, trail: list[str]) -> list[str] | None:
        if current is target:
            return trail
        if isinstance(current, yaml.MappingNode):
            for k, v in current.value:
                found = find(v, target, trail + [str(k.value)])
                if found is not None:
                    return found
        elif isinstance(current, yaml.SequenceNode):
            for i, v in enumerate(current.value):
                found = find(v, target, trail[:-1] + [f"{trail[-1]}[{i}]"] if trail else [f"[{i}]"])
                if found is not None:
                    return found
        return None

    trail = find(loader._root, node, []) if getattr(loader, "_root", None) is not None else None
    return ".".join((trail or []) + [str(key)])


def load_strict(text: str) -> Any:
    """Parse one YAML document like `yaml.safe_load`, refusing duplicate keys (DuplicateKeyError)."""
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        loader._root = root
        return loader.construct_document(root)
    finally:
        loader.dispose()
