"""A grid file's YAML, read strictly and within bounds.

PyYAML's safe loader lets a later key replace an earlier one of the same name (a second
``zs:`` under ``methods`` drops the first method's cells without a word) and builds whatever
aliases expand to (a few nested anchors, the "billion laughs", stand for billions of values).
The loader here refuses both while the document is composed, before any value is built:

- a key written twice in one mapping, block or flow style, at any depth (two ``<<`` merge keys
  included; ``1`` and ``true`` count as one key, as they would in the decoded mapping). A key
  written beside a ``<<`` merge overrides the merged one, as YAML defines: not a duplicate;
- more than ``MAX_VALUES`` values once every alias is expanded, more than ``MAX_ALIASES``
  aliases, values nested deeper than ``MAX_DEPTH`` (aliases expanded), an alias inside its
  own anchor (a document that contains itself);
- a file over ``MAX_BYTES``, text that is not UTF-8, a value its tag cannot hold
  (``!!int abc``), and a NUL character, raw or escaped (``"a\\0b"``).

Every refusal is a ``LampError`` that names the file, the key and the line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import ScalarNode, SequenceNode

from LaMP.utils.errors import LampError

# A grid is a page of YAML (the shipped ones are 1.5-2.5 kB and under 300 values once
# expanded); these bounds are far above any real grid and far below what exhausts memory.
MAX_BYTES = 1 << 20
MAX_VALUES = 100_000
MAX_ALIASES = 1_000
MAX_DEPTH = 32
MAX_SHOWN_PARTS = 8  # of a key's path in an error line
MERGE_TAG = "tag:yaml.org,2002:merge"
_MERGE = object()  # the key of a ``<<`` entry, whatever its spelling


class _GridLoader(yaml.SafeLoader):
    """SafeLoader that counts while it composes: each node's size and height with its aliases
    expanded (from its children's, so a bomb is caught at the first node too large, having
    built nothing), and refuses duplicate keys."""

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self.source = source
        self.aliases = 0
        self.path: list[str] = []  # the keys and positions down to the node being composed
        self.expanded: dict[yaml.Node, tuple[int, int]] = {}  # node -> (values, height)

    def _refuse(self, mark, what: str, more: str = ""):
        """``<file>: <key>: <what> at line N<more>``."""
        parts = [part for part in self.path if part]
        # A nesting bomb's path would fill the screen: the first few parts stand for it.
        cut = "…" if len(parts) > MAX_SHOWN_PARTS else ""
        where = ".".join(parts[:MAX_SHOWN_PARTS]).replace(".[", "[") + cut or "grid"
        raise LampError(f"{self.source}: {where}: {what} at line {mark.line + 1}{more}")

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        self.path.append(_label(index))
        try:
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    self._refuse(mark, f"more than {MAX_ALIASES:,} aliases", "; a grid needs a "
                                                                             "few")
                node = super().compose_node(parent, index)
                if node not in self.expanded:  # its anchor is still being composed
                    self._refuse(mark, "an alias inside its own anchor",
                                 " (the value would contain itself)")
                return node
            if len(self.path) > MAX_DEPTH:
                self._refuse(mark, f"nested deeper than {MAX_DEPTH} levels")
            node = super().compose_node(parent, index)
            if isinstance(node, ScalarNode) and "\x00" in node.value:
                # Written "\0", "\x00" or "\u0000": no path or command line can hold it,
                # so neither a stage's argv nor a --dry_run line could carry it.
                self._refuse(mark, "a NUL character (\\0) in a value")
            children = ([] if isinstance(node, ScalarNode) else node.value
                        if isinstance(node, SequenceNode) else
                        [child for pair in node.value for child in pair])
            sizes = [self.expanded[child] for child in children]
            values = 1 + sum(size for size, _ in sizes)
            height = 1 + max((depth for _, depth in sizes), default=0)
            if values > MAX_VALUES:
                self._refuse(mark, f"more than {MAX_VALUES:,} values once its aliases are "
                                   "expanded", " (an alias repeats all its anchor holds)")
            if height > MAX_DEPTH:
                self._refuse(mark, f"nested deeper than {MAX_DEPTH} levels once its aliases "
                                   "are expanded")
            self.expanded[node] = (values, height)
            return node
        finally:
            self.path.pop()

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        first: dict[Any, ScalarNode] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                key = _MERGE
            elif isinstance(key_node, ScalarNode):
                # Built now as it will be built (cached by node): "1" and "0x1" are one key.
                key = self.construct_object(key_node)
            else:
                continue  # a list or mapping as a key: the constructor refuses it (unhashable)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:
                continue
            if earlier is not key_node:
                self._refuse(key_node.start_mark, f"duplicate key {_shown(key_node.value)}",
                             f" (first at line {earlier.start_mark.line + 1}); one would "
                             "silently replace the other")
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as error:
            # A scalar its tag cannot hold: !!int abc, !!timestamp 2020-13-45, 5000 digits.
            problem = str(error).split(";")[0]
            shown = _shown(node.value) if isinstance(node, ScalarNode) else ""
            raise LampError(f"{self.source}: the value {shown} at line "
                            f"{node.start_mark.line + 1} is not a valid {node.tag} "
                            f"({problem})") from None


def _shown(text) -> str:
    """A key or value from the file, quoted and cut short for an error line."""
    text = str(text)
    return repr(text if len(text) <= 40 else text[:40] + "…")


def _label(index) -> str:
    """How a node's place reads in an error: its key, or its position in a list."""
    if isinstance(index, int):
        return f"[{index}]"
    if isinstance(index, ScalarNode):
        text = str(index.value)
        return text if len(text) <= 40 else text[:40] + "…"
    return "?" if index is not None else ""


def read_yaml(path: Path) -> Any:
    """The decoded document of a grid file (already checked readable)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)  # a pipe has no size to check up front
    except OSError as error:
        raise LampError(f"{path}: cannot read ({error.strerror or error})") from None
    if len(data) > MAX_BYTES:
        raise LampError(f"{path}: more than {MAX_BYTES:,} bytes is too large for a grid file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LampError(f"{path}: not UTF-8 text (byte {error.start})") from None
    loader = None
    try:
        loader = _GridLoader(text, str(path))  # checks the characters: a NUL is refused
        return loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise LampError(f"{path}: not valid YAML{where} ({problem})") from None
    finally:
        if loader is not None:
            loader.dispose()
