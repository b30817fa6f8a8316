"""The pronunciation lexicon: words rewritten before a row is split and sent, and only what changes narrated again."""

from __future__ import annotations

import json
import string

from conftest import cli, ledger_rows, write_csv
from hypothesis import given
from hypothesis import strategies as st

from batchtts.config import Job
from batchtts.lexicon import Entry, Lexicon
from batchtts.manifest import Row
from batchtts.markup import Cast
from batchtts.script import prepare, split_script

MODEL = "openai/gpt-4o-mini-tts"
PARAGRAPHS = [
    "The keeper climbed the stair at dusk. The lamp was cold and the glass was dark with salt.",
    "Mr. Nguyen came up behind him with the oil. He said nothing at all about the storm.",
    "They trimmed the wick together and waited. Far out, a bell rang twice on the reef.",
    "By midnight the beam swept the water again. Mr. Nguyen slept in the chair by the door.",
]
NOTE = "A short note with no names in it."


def row(text: str, model: str = MODEL, voice: str = "alloy", language: str | None = None) -> Row:
    return Row(1, "r", text, model, voice, "mp3", None, None, None, {}, language)


def said(text: str, lexicon: Lexicon, **scope: str) -> str:
    return prepare(row(text, **scope), lexicon, Cast()).row.spoken


def run(tmp_path, server, *extra: str):
    return cli("run", tmp_path / "m.csv", "--out", tmp_path / "out", "--model", MODEL, "--voice", "alloy",
               "--base-url", server.url, "--format", "pcm", "--chunk-chars", "160", *extra)


def test_an_edited_entry_asks_again_only_for_the_chunks_that_hold_the_word(serve, tmp_path):
    server = serve()
    write_csv(tmp_path / "m.csv", [{"id": "ch", "text": "\n\n".join(PARAGRAPHS)}, {"id": "note", "text": NOTE}])
    assert run(tmp_path, server).returncode == 0
    assert server.stats()["requests"] == 5  # a chunk a paragraph, and the note
    before = ledger_rows(tmp_path / "out" / "ledger.sqlite")

    lexicon = tmp_path / "lexicon.csv"
    lexicon.write_text("pattern,replacement\nNguyen,Win\n", encoding="utf-8")
    assert run(tmp_path, server, "--lexicon", lexicon).returncode == 0
    # The two paragraphs that name him, as the lexicon says them; nothing else, and never the written name.
    assert server.stats()["requests"] == 7
    for text in (PARAGRAPHS[1], PARAGRAPHS[3]):
        assert server.requests_for(text) == 1 and server.requests_for(text.replace("Nguyen", "Win")) == 1
    after = ledger_rows(tmp_path / "out" / "ledger.sqlite")
    assert after["note"]["fingerprint"] == before["note"]["fingerprint"]  # a row the lexicon leaves alone
    assert after["ch"]["fingerprint"] != before["ch"]["fingerprint"] and after["ch"]["status"] == "done"

    lexicon.write_text("pattern,replacement\nNguyen,Wen\n", encoding="utf-8")
    assert run(tmp_path, server, "--lexicon", lexicon).returncode == 0
    assert server.stats()["requests"] == 9
    assert all(server.requests_for(text.replace("Nguyen", "Wen")) == 1 for text in (PARAGRAPHS[1], PARAGRAPHS[3]))
    assert all(server.requests_for(text) == 1 for text in (PARAGRAPHS[0], PARAGRAPHS[2], NOTE))

    assert run(tmp_path, server, "--lexicon", lexicon).returncode == 0
    assert server.stats()["requests"] == 9  # nothing left to do


def test_an_entry_scoped_to_a_voice_rewrites_that_voice_s_rows_only(serve, tmp_path):
    server = serve()
    text = "Ask the US office, and tell us the answer."
    write_csv(tmp_path / "m.csv", [{"id": "a", "text": text, "voice": "alloy"}, {"id": "n", "text": text, "voice": "nova"},
                                   {"id": "fr", "text": "Le chat dort.", "voice": "nova", "language": "fr-FR"}])
    (tmp_path / "job.toml").write_text(
        f'manifest = "m.csv"\nout = "out"\n[defaults]\nmodel = "{MODEL}"\nformat = "pcm"\n[lexicon]\nentries = [\n'
        '  { pattern = "US", replacement = "U.S.", voice = "nova" },\n'
        '  { pattern = "chat", replacement = "sha", language = "fr" },\n'
        '  { pattern = "Ask", replacement = "Query", model = "elevenlabs/" },\n]\n', encoding="utf-8")
    result = cli("run", tmp_path / "job.toml", "--base-url", server.url)
    assert result.returncode == 0, result.stderr
    assert server.requests_for(text) == 1  # alloy's row, as written: "us" is another word
    assert server.requests_for("Ask the U.S. office, and tell us the answer.") == 1
    assert server.requests_for("Le sha dort.") == 1
    assert server.stats()["requests"] == 3
    # Status counts the rows as the job says them: the lexicon's rows are done, not pending.
    status = cli("status", "--job", tmp_path / "job.toml", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["done"], report["pending"]) == (3, 0)


def test_whole_words_case_and_order():
    lexicon = Lexicon([Entry("Bob", "Robert"), Entry("Robert", "Rob"), Entry("C++", "C plus plus"),
                       Entry(r"(\d+)km", r"\1 kilometres", regex=True)])
    assert said("Bob met Bobby, bob and BOB.", lexicon) == "Rob met Bobby, bob and BOB."  # each entry sees the last's
    assert said("We wrote C++ and C++11 in 3km.", lexicon) == "We wrote C plus plus and C++11 in 3 kilometres."
    assert said("x" * 10, Lexicon([Entry("y*", "z", regex=True)])) == "x" * 10  # empty matches replace nothing
    assert said("Nguyen", Lexicon([Entry("Nguyen", "Win", model="openai/")]), model="local/espeak-ng") == "Nguyen"
    assert said("Nguyen", Lexicon([Entry("Nguyen", "Win", model="openai/")])) == "Win"


def test_a_row_the_lexicon_leaves_alone_keeps_its_fingerprint_and_chunks():
    text = "\n\n".join(PARAGRAPHS)
    plain = row(text)
    untouched = prepare(plain, Lexicon([Entry("Smith", "Smyth")]), Cast())
    assert untouched.row is plain and untouched.pieces is None
    lexicon = Lexicon([Entry("Nguyen", "Win"), Entry(r"Mr\.", "Mister", regex=True), Entry("Mister Win", "Mr Win")])
    changed = prepare(plain, lexicon, Cast())
    assert changed.row.fingerprint != plain.fingerprint and changed.row.text == text
    chunks = split_script(changed, 160)
    assert [c.text for c in chunks] == [p.replace("Mr. Nguyen", "Mr Win") for p in PARAGRAPHS]
    # Each chunk knows its words as written, for the captions, and where they are in the row's text.
    assert [c.caption for c in chunks] == PARAGRAPHS
    assert [text[c.start:c.start + len(PARAGRAPHS[i])] for i, c in enumerate(chunks)] == PARAGRAPHS


def test_a_bad_lexicon_is_a_message_naming_file_and_line_and_exit_2(tmp_path):
    write_csv(tmp_path / "m.csv", [{"text": "Hello."}])
    cases = {
        "pattern,replacement,regex\nok,fine,\n(unclosed,x,true\n": "line 3: the pattern is not a valid regular expression",
        "pattern,replacement,regex\n(a),\\2,true\n": "line 2: the replacement does not fit the pattern",
        "pattern,replacement,regex\nword,other,maybe\n": "line 2: regex is 'maybe'",
        "pattern,replacment\nword,other\n": "line 1: unknown column 'replacment' (did you mean replacement?)",
        "pattern,replacement\n\nword\n": "line 3: 1 fields where the header has 2",
    }
    for number, (content, said_) in enumerate(cases.items()):
        lexicon = tmp_path / f"lexicon{number}.csv"
        lexicon.write_text(content, encoding="utf-8")
        result = cli("run", tmp_path / "m.csv", "--out", tmp_path / "out", "--model", "local/espeak-ng", "--voice",
                     "alloy", "--lexicon", lexicon)
        assert result.returncode == 2, result.stdout
        assert f"{lexicon}, {said_}" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "job.toml").write_text('manifest = "m.csv"\nout = "out"\n[lexicon]\n'
                                       'entries = [{ pattern = "a[", replacement = "b", regex = true }]\n')
    result = cli("run", tmp_path / "job.toml", "--model", "local/espeak-ng", "--voice", "alloy")
    assert result.returncode == 2 and "job.toml: [lexicon] entries[1]: the pattern is not a valid" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_the_job_file_s_lexicon_file_is_relative_to_it_and_the_flag_takes_its_place(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "words.tsv").write_text("pattern\treplacement\tvoice\nNguyen\tWin\tnova\n", encoding="utf-8")
    (tmp_path / "other.csv").write_text("pattern,replacement\nLe,La\n", encoding="utf-8")
    (tmp_path / "jobs" / "job.toml").write_text('manifest = "m.csv"\nout = "out"\n[lexicon]\nfile = "words.tsv"\n'
                                                'entries = [{ pattern = "Hale", replacement = "Hail" }]\n')
    from batchtts.config import load_job

    job = load_job(tmp_path / "jobs" / "job.toml")
    assert [(e.pattern, e.voice) for e in job.lexicon.entries] == [("Nguyen", "nova"), ("Hale", None)]
    flagged = load_job(tmp_path / "jobs" / "job.toml", lexicon=tmp_path / "other.csv")
    assert [e.pattern for e in flagged.lexicon.entries] == ["Le", "Hale"]
    assert Job(manifest=tmp_path / "m.csv", out=tmp_path).lexicon == Lexicon()


WORDS = st.text(alphabet=string.ascii_letters + "é", min_size=1, max_size=8)


@given(words=st.lists(WORDS, min_size=1, max_size=6), text=st.text(max_size=200))
def test_literal_words_never_change_a_text_without_them(words, text):
    lexicon = Lexicon([Entry(word, word.upper() + "!") for word in words])
    if all(word not in text for word in words):
        assert lexicon.rewrite(text, MODEL, "alloy") is None


@given(word=WORDS, before=st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=3),
       text=st.text(max_size=50))
def test_a_literal_word_inside_a_longer_word_is_left_alone(word, before, text):
    lexicon = Lexicon([Entry(word, "REPLACED")])
    hidden = f"{text} {before}{word}{before}"
    rewritten = lexicon.rewrite(hidden, MODEL, "alloy")
    assert rewritten is None or rewritten.text.endswith(f" {before}{word}{before}")
