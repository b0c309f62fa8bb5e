"""docs/conformance.md cannot drift from the code: every SOP class and transfer syntax the node
accepts, every one it sends or asks for, the objects it creates and the private codes it
writes are named in it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import ALL_TRANSFER_SYNTAXES

import pipelines.codes as codes
from node.edge.acceptor import supported_contexts
from node.edge.qr import QUERY_RETRIEVE_CLASSES
from node.edge.retrieve import (
    GET_STORAGE_CLASSES,
    GET_SYNTAXES,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
)
from node.ops.implementation import IMPLEMENTATION_CLASS_UID

STATEMENT = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"
CREATED = {
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
}


@pytest.fixture(scope="module")
def statement() -> str:
    return STATEMENT.read_text()


def test_every_accepted_sop_class_and_syntax_is_named(statement: str) -> None:
    contexts = supported_contexts()
    missing = {
        str(context.abstract_syntax)
        for context in contexts
        if f"`{context.abstract_syntax}`" not in statement
    }
    assert not missing, f"accepted but not in docs/conformance.md: {sorted(missing)}"
    accepted_syntaxes = {str(s) for context in contexts for s in context.transfer_syntax}
    assert accepted_syntaxes <= set(ALL_TRANSFER_SYNTAXES)
    absent = [s for s in ALL_TRANSFER_SYNTAXES if f"`{s}`" not in statement]
    assert not absent, f"transfer syntaxes not in docs/conformance.md: {absent}"


def test_the_query_retrieve_classes_and_what_the_node_sends_are_named(statement: str) -> None:
    for uid in QUERY_RETRIEVE_CLASSES:
        assert f"| {uid.name} | `{uid}` | no | yes |" in statement or uid in (
            STUDY_ROOT_FIND,
            STUDY_ROOT_MOVE,
            STUDY_ROOT_GET,
        ), uid
    for uid in (STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET):  # also as SCU (fetches)
        assert f"| `{uid}` | yes (fetches) | yes |" in statement, uid
    for uid in (*GET_STORAGE_CLASSES, *GET_SYNTAXES):
        assert f"`{uid}`" in statement, uid
    for uid, name in CREATED.items():
        assert f"| {name} | `{uid}` |" in statement
    assert f"`{IMPLEMENTATION_CLASS_UID}`" in statement


def test_every_private_code_is_declared(statement: str) -> None:
    private = [
        value
        for value in vars(codes).values()
        if isinstance(value, codes.Code) and value.scheme == codes.PRIVATE_SCHEME
    ]
    assert private
    for code in private:
        assert f"| `{code.value}` | {code.meaning} |" in statement, code


def test_every_task_a_workitem_may_ask_for_is_declared(statement: str) -> None:
    from pipelines.registry import type_names

    annex = statement.split("## Annex A.4", 1)[1]
    for name in type_names():
        assert f"| `{name}` |" in annex, name
