"""LaMP-6 from Avocado: real-world headers and HTML bodies."""
from __future__ import annotations

import pytest

from LaMP.utils.avocado import html_to_text, parse_email


# --- headers -------------------------------------------------------------------------------

@pytest.mark.parametrize("data, subject", [
    # Raw UTF-8 in a header, as real mail has it (was d\udcc3\udca9j\udcc3\udca0 vu).
    ("Subject: déjà vu\n\nbody".encode(), "déjà vu"),
    (b"Subject: d\xc3\xa9j\xc3\xa0\r\n vu\r\n\r\nbody\r\n", "déjà vu"),
    # Raw bytes and an encoded word in one header.
    (b"Subject: d\xc3\xa9j\xc3\xa0 =?utf-8?q?vu_=C3=A0_Paris?=\n\nbody", "déjà vu à Paris"),
    # Not UTF-8 and no charset declared: latin-1.
    (b"Subject: d\xe9j\xe0 vu\n\nbody", "déjà vu"),
    # Not UTF-8: the charset the email declares, before latin-1.
    (b"Subject: \xcf\xf0\xe8\xe2\xe5\xf2\nContent-Type: text/plain; charset=windows-1251\n\nx",
     "Привет"),
    (b"Subject: \xcf\xf0\xe8\xe2\xe5\xf2\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
     b"Content-Type: text/plain; charset=windows-1251\n\nx\n--b--\n", "Привет"),
    # Encoded words: base64, a mislabelled charset, an RFC 2231 language, folded words.
    (b"Subject: =?utf-8?b?Y2Fmw6k=?=\n\nx", "café"),
    (b"Subject: =?us-ascii?q?caf=C3=A9?=\n\nx", "café"),
    (b"Subject: =?utf-8*en?q?caf=C3=A9?=\n\nx", "café"),
    (b"Subject: Re: =?utf-8?q?caf=C3=A9?= menu\n =?utf-8?q?for?=\n =?utf-8?q?_Friday?=\n\nx",
     "Re: café menu for Friday"),
    (b"Subject: =?utf-8?b?a?=\n\nx", "=?utf-8?b?a?="),  # broken base64: kept as written
])
def test_header_decoding(data, subject):
    assert parse_email(data).subject == subject


@pytest.mark.parametrize("data, body", [
    (b"Subject: x\n\nr\xe9sum\xe9 attached", "résumé attached"),  # no charset, not UTF-8
    (b"Subject: x\nContent-Type: text/plain; charset=us-ascii\n\ncaf\xc3\xa9", "café"),
    (b"Subject: x\nContent-Type: text/plain; charset=a\x00b\n\ncaf\xc3\xa9", "café"),
    (b"Subject: x\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
     b"JVBERi0xLjQ=\n", ""),  # a single part that is not text has no body
])
def test_body_decoding(data, body):
    assert parse_email(data).body == body


# --- HTML bodies ---------------------------------------------------------------------------

HTML = (b"<html><head><title>Newsletter</title><style>p { color: red }</style></head>\n"
        b"<body>\n  <p>Hello&nbsp;team,</p>\n  <p>Q3 &amp; Q4 are\n  attached &mdash; see"
        b"<br>row 4.<br/><br>Thanks</p><script>alert('x')</script>\n<ul>\n <li>one</li>\n"
        b" <li>two &lt;b&gt;</li>\n</ul></body></html>")
HTML_TEXT = "Hello team,\n\nQ3 & Q4 are attached — see\nrow 4.\n\nThanks\n\none\ntwo <b>"


def alternative(*parts: tuple[str, bytes], outer: str = "alternative") -> bytes:
    body = b"".join(b"--b\nContent-Type: " + kind.encode() + b"\n\n" + payload + b"\n"
                    for kind, payload in parts)
    return (b"Subject: x\nMIME-Version: 1.0\nContent-Type: multipart/" + outer.encode()
            + b'; boundary="b"\n\n' + body + b"--b--\n")


@pytest.mark.parametrize("data, body", [
    (b"Subject: x\nContent-Type: text/html; charset=utf-8\n\n" + HTML, HTML_TEXT),
    (alternative(("text/html; charset=utf-8", HTML)), HTML_TEXT),
    (alternative(("text/html; charset=iso-8859-1\nContent-Transfer-Encoding: "
                  "quoted-printable", b"<p>r=E9sum=E9</p><p>&eacute;t&eacute;</p>")),
     "résumé\n\nété"),
    # text/plain wins when both are there, whatever their order.
    (alternative(("text/html", b"<p>the html</p>"), ("text/plain", b"the plain text")),
     "the plain text"),
    # An HTML attachment is not the body.
    (alternative(("text/html\nContent-Disposition: attachment; filename=a.html",
                  b"<p>attached</p>"), outer="mixed"), ""),
])
def test_html_bodies_become_text(data, body):
    assert parse_email(data).body == body


@pytest.mark.parametrize("markup, text", [
    # Word's conditional sections, CDATA, and sections the standard parser raises
    # AssertionError on (an unknown keyword, no keyword) are markup, not text.
    ("<p>a</p><![if !supportLists]>-<![endif]>b", "a\n\n-b"),
    ("x<![CDATA[hidden]]>y<![foo bar]>z<![ ]>w", "xyzw"),
    ("<pre>col1  col2\nrow</pre>after", "col1 col2\nrow\n\nafter"),
    ("<div>one<div>two</div></div>three", "one\n\ntwo\n\nthree"),
    ("<script>never closed", ""),
    ("&#233;&eacute;&bogus; &#x41;", "éé&bogus; A"),
])
def test_html_to_text(markup, text):
    assert html_to_text(markup) == text
