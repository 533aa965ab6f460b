"""Walking a snapshot's tree: every node with its path, depth first, names in order."""

from __future__ import annotations

from typing import Iterator

from kyrorepo.format import BlobType
from kyrorepo.repository import Repository
from kyrorepo.tree import DIR, Node, decode_tree, iter_chunk_refs, Ref


def load_tree(repo: Repository, tree_id: bytes) -> list[Node]:
    return decode_tree(repo.load_blob(tree_id, BlobType.TREE), f"tree {tree_id.hex()[:16]}")


def walk(repo: Repository, tree_id: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, Node]]:
    """Yield (relative path, node) for every entry below ``tree_id``, parents first."""
    for node in load_tree(repo, tree_id):
        path = prefix + b"/" + node.name if prefix else node.name
        yield path, node
        if node.type == DIR and node.subtree is not None:
            yield from walk(repo, node.subtree, path)


def chunk_refs(repo: Repository, node: Node) -> Iterator[Ref]:
    return iter_chunk_refs(node, lambda bid: repo.load_blob(bid, BlobType.CONTENT))


def find_node(repo: Repository, tree_id: bytes, path: bytes) -> Node | None:
    """The node at ``path`` (slash separated, relative) or None."""
    parts = [p for p in path.split(b"/") if p and p != b"."]
    node: Node | None = None
    current = tree_id
    for i, part in enumerate(parts):
        node = next((n for n in load_tree(repo, current) if n.name == part), None)
        if node is None:
            return None
        if i < len(parts) - 1:
            if node.type != DIR or node.subtree is None:
                return None
            current = node.subtree
    return node
