"""YAML as the run config reads it: safe, within limits on size and depth (an alias bomb or a deeply nested document
is refused before anything is built), and, for a config file, without a key given twice in one mapping."""

from __future__ import annotations

from typing import Any

import yaml


class KeyTwice(Exception):
    pass


YAML_MAX_NODES = 100_000  # values in a config once its aliases are expanded (a real one has hundreds)
YAML_MAX_DEPTH = 32  # sections within sections (a real config has 4)


class TooLarge(Exception):
    """A YAML document past `YAML_MAX_NODES` or `YAML_MAX_DEPTH`; the message says which."""


class LimitedLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a document whose aliases would expand past `YAML_MAX_NODES` values (an alias
    bomb: a few lines that name a mapping of aliases of a mapping of aliases ...) or that nests deeper than
    `YAML_MAX_DEPTH`, before constructing anything: the composed node graph holds each anchored node once, and its
    expanded size is counted once per distinct node, so the check takes the document's time and memory."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _check_node_graph(node)
        return self.construct_document(node)


def _check_node_graph(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}  # id(node) -> values it expands to
    depths: dict[int, int] = {}
    stack = [(root, False)]
    while stack:  # iterative post-order: a deep document must not exhaust Python's stack here
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if not done:
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
        depths[id(node)] = 1 + max((depths[id(c)] for c in children), default=0)
        if sizes[id(node)] > YAML_MAX_NODES:
            raise TooLarge(f"aliases that expand past {YAML_MAX_NODES:,} values (an alias bomb?)")
        if depths[id(node)] > YAML_MAX_DEPTH:
            raise TooLarge(f"nesting deeper than {YAML_MAX_DEPTH} levels")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def safe_load(text: str) -> Any:
    """`yaml.safe_load` within the limits of `LimitedLoader`."""
    return yaml.load(text, Loader=LimitedLoader)


class StrictLoader(LimitedLoader):
    """YAML's safe loader within limits, except that a key given twice in one mapping is an error (YAML keeps the
    last silently)."""

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in lines:
                raise KeyTwice(key, lines[key], line)
            lines[key] = line
        return super().construct_mapping(node, deep)
