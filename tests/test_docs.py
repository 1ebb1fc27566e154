"""The docs embed generated tables; these tests keep them current."""
from pathlib import Path

from npapprox.ledger import saves_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_storage_doc_has_the_current_saves_table():
    text = (DOCS / "storage.md").read_text()
    assert saves_table() in text, ("docs/storage.md is out of date: paste "
                                   "npapprox.ledger.saves_table() into its 'What each op saves' section")
