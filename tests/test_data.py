"""Calibration/evaluation text: cleaning, the document split, bad input."""

import pytest

from ramp.assets import asset_path
from ramp.data import TextDataError, read_wiki_documents, split_documents, wiki_split


def test_default_split_is_disjoint_by_document():
    docs = read_wiki_documents(asset_path("wiki"))
    calib, evaluation = split_documents(docs)
    assert len(calib) + len(evaluation) == 494  # documents with >= 100 words (SPEC §10)
    assert len(calib) == int(0.6 * 494)
    assert not {d.doc_id for d in calib} & {d.doc_id for d in evaluation}
    calib_text, eval_text = wiki_split(asset_path("wiki"))
    assert all(d.text not in calib_text for d in evaluation[:20])
    assert "<doc" not in eval_text and "</doc>" not in calib_text


def test_title_line_is_dropped_and_markup_optional(tmp_path):
    p = tmp_path / "w.utf8"
    body = " ".join(["word"] * 120)
    p.write_text(f'<doc id="1" url="u" title="T &amp; U">\nT &amp; U\n\nA [[link|Linked]] &amp; {body}\n</doc>\n')
    (doc,) = read_wiki_documents(p)
    assert doc.text.startswith("A [[link|Linked]] &amp;")
    (clean,) = read_wiki_documents(p, markup=True)
    assert clean.text.startswith("A Linked & word")


def test_bad_text_inputs(tmp_path):
    with pytest.raises(TextDataError, match="no such text file"):
        read_wiki_documents(tmp_path / "none.utf8")
    (tmp_path / "empty.utf8").write_text("")
    with pytest.raises(TextDataError, match="empty.utf8: the text file is empty"):
        read_wiki_documents(tmp_path / "empty.utf8")
    (tmp_path / "plain.utf8").write_text("just text")
    with pytest.raises(TextDataError, match="no <doc"):
        read_wiki_documents(tmp_path / "plain.utf8")
