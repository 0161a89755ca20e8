"""Training text: the @mixed preset (SOTU train split + Moby-Dick + SpamAssassin ham mail, fetched
with npm as the default corpus is) and the mail clean-up it relies on."""

from d2dmoe_converter.corpus import MIXED, load_corpus, mail_body

RAW = ("From someone@example.org  Thu Aug 22 12:36:23 2002\nReturn-Path: <a@b.org>\nSubject: Re: kernels\n\n"
       "> what you wrote before\n>> and before that\nReceived: from a forwarded message\nThe new build works on both machines now; the second "
       "core is idle during the link step, which is what we expected from the profile. I will send the "
       "numbers once the nightly run has finished and the logs are copied over.\n")


def test_mail_body_drops_headers_quotes_html_and_short_mail():
    body = mail_body(RAW)
    assert body.startswith("The new build works") and "Subject:" not in body and ">" not in body
    assert "Received:" not in body
    assert mail_body(RAW.replace("The new build", "<html><body>The new build")) is None
    assert mail_body("Subject: hi\n\nthanks!\n") is None        # shorter than MIN_MAIL_CHARS
    assert mail_body("no blank line, so no body") is None


def test_mixed_corpus_adds_books_and_mail_and_keeps_the_sotu_heldout():
    default, mixed = load_corpus(), load_corpus(MIXED)
    assert mixed.heldout == default.heldout                       # results stay comparable
    assert mixed.train[: len(default.train)] == default.train
    extra = mixed.train[len(default.train):]
    assert any(doc.startswith("Loomings.") for doc in extra)      # Moby-Dick, chapter 1
    assert len(extra) > 3000 and sum(map(len, extra)) > 5_000_000  # 135 chapters + ~3.6k mails, ~8 MB
    assert not any(line.startswith(("Return-Path:", "Received:")) for doc in extra for line in doc.split("\n"))
    assert not any("<html" in doc.lower() for doc in extra)
    assert "Moby-Dick" in mixed.name and "ham mail" in mixed.name


def test_heldout_text_replaces_the_default_and_names_itself(tmp_path):
    """--heldout applies to the default corpus too, and is part of the corpus name (which the stage
    fingerprints hash, so calibration reruns when the held-out text changes)."""
    (tmp_path / "a.txt").write_text("Held-out text of the user's own. " * 40)
    default, own = load_corpus(), load_corpus(None, str(tmp_path))
    assert own.train == default.train and own.heldout == ((tmp_path / "a.txt").read_text(),)
    assert own.name != default.name and str(tmp_path) in own.name
