"""A module whose top-level imports test fusefs.python_imports (compiled by several CPython versions)."""

import json
import os.path as osp
import xml.etree.ElementTree, collections  # noqa: E401
from . import sibling
from .pkg.inner import helper as renamed, other
from .. import cousin
from email.mime import text

try:
    import _json
except ImportError:
    _json = None

if osp.sep == "/":
    import codecs

ENCODED = b"\x00\x01\xff" * 3
BIG = 2**70
VALUES = {"a": 1.5, "b": 2j, "c": frozenset({1, 2})}


def later() -> None:
    import tomllib  # inside a function: not run on import

    print(tomllib, json, renamed, other, cousin, text, xml, collections, sibling, codecs)


class Thing:
    import enum  # class bodies are separate code objects too
