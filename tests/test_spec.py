"""protocol.md cannot drift from the code: its generated tables (message types per link, fields,
types, required flags, defaults, the guest channel's ops, error codes, limits) must equal what
``wire.spec`` generates from the records and constants, every limit it states must equal the
constant it names, and every section a comment cites must exist in the document it cites.

The second half checks the checker: each kind of drift, made on purpose in memory, is caught."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from wire import guest, messages, protocol, spec
from wire.schema import INT, FieldSpec, Link

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_MD = ROOT / "protocol.md"
MAX_PROTOCOL_MD = (
    44 * 1024
)  # ~30 KB asked for; issue 10 added tools, modules, values and console records; narrative goes to docs/design.md


@pytest.fixture
def generated() -> dict[str, str]:
    return spec.render_all()


@pytest.fixture(scope="module")
def doc() -> str:
    return PROTOCOL_MD.read_text()


# ---- protocol.md against the code --------------------------------------------------------------


def test_protocol_md_stays_short(doc: str) -> None:
    size = len(doc.encode())
    assert size <= MAX_PROTOCOL_MD, f"protocol.md is {size} bytes; narrative belongs in docs/design.md"


def test_protocol_md_has_exactly_the_generated_blocks(doc: str) -> None:
    assert sorted(spec.blocks_in(doc)) == sorted(spec.BLOCKS)


@pytest.mark.parametrize("name", list(spec.BLOCKS))
def test_generated_block_matches_the_code(name: str, doc: str) -> None:
    want = spec.render(name)
    have = spec.blocks_in(doc)[name]
    if have != want.strip():
        problems = spec.check_text(doc, {name: want})
        pytest.fail("\n".join(problems) + "\n(regenerate with: python -m wire.spec --write protocol.md)")


@pytest.mark.parametrize(
    ("limit", "place"),
    [pytest.param(lim, place, id=f"{lim.name}@{place}") for lim in spec.LIMITS for place in lim.places],
)
def test_stated_limit_equals_the_constant(limit: spec.Limit, place: str) -> None:
    value = spec.code_value(place)
    assert value == limit.value, f"protocol.md states {limit.name} = {limit.value!r}; {place} is {value!r}"


def test_every_error_code_has_one_meaning() -> None:
    codes = [code for _, code in spec.error_codes()]
    assert len(codes) == len(set(codes))
    assert sorted(spec.ERRORS) == sorted(codes)


def test_every_field_kind_has_a_meaning() -> None:
    kinds = {spec._kind_name(f) for cls in spec.records_of(messages) for f in cls.FIELDS}
    assert kinds <= set(spec.KINDS)
    guest_kinds = {spec._kind_name(f) for cls in spec.guest_records() for f in cls.FIELDS}
    assert guest_kinds <= set(spec.GUEST_KINDS)


def test_the_guest_tables_cover_every_guest_record() -> None:
    assert set(spec.guest_records()) == set(spec.records_of(guest))


def test_every_init_limit_is_a_stated_limit() -> None:
    """Each limit bootstrap.js receives in `init` is a row of the limits table, at its wire.guest
    constant (bootstrap.js reading each of them is tests/test_daemon_units.py's check)."""
    places = {place for lim in spec.LIMITS for place in lim.places}
    for f in guest.Init.FIELDS:
        if f.kind is INT:
            place = f"wire.guest.{f.name.upper()}"
            assert place in places, f"init.{f.name}: add a wire/spec.py LIMITS row for {place}"
            assert spec.code_value(place) == f.default


def test_check_mode_passes_on_protocol_md(capsys: pytest.CaptureFixture[str]) -> None:
    assert spec.main(["--check", str(PROTOCOL_MD)]) == 0, capsys.readouterr().err


def test_every_cited_section_exists() -> None:
    """A comment citing "protocol.md 2.2", "docs/design.md, Z5" or a section title names a heading
    that exists (regenerate nothing: fix the comment, or the document's heading)."""
    assert spec.citation_problems() == []


def test_the_citations_are_found() -> None:
    """The scan sees the citations it must check (a scan that finds nothing passes trivially)."""
    found = {(c.path, c.doc, c.ref) for p in spec.code_files() for c in spec.citations_in(p.read_text(), str(p))}
    assert len(found) >= 10
    assert any(doc == "design.md" for _, doc, _ in found) and any(doc == "protocol.md" for _, doc, _ in found)


def test_no_code_cites_a_document_outside_the_repository() -> None:
    needle = "notes-zeromq"
    here = Path(__file__).resolve()  # names it, to check for it
    citing = [
        str(p.relative_to(ROOT))
        for p in spec.code_files()
        if p.resolve() != here and needle in p.read_text(errors="replace")
    ]
    assert not citing, f"cite docs/design.md instead: {citing}"


# ---- the checker catches each kind of drift --------------------------------------------------------


def _problems(doc: str, **blocks: str) -> list[str]:
    return spec.check_text(doc, blocks)


def test_a_changed_field_meaning_in_the_document_is_caught(doc: str, generated: dict[str, str]) -> None:
    assert "| `resp_sid` | bin16 |" in doc
    edited = doc.replace("| `resp_sid` | bin16 |", "| `resp_sid`? | bin16 |", 1)
    assert _problems(edited, messages=generated["messages"])


def _with_field(cls: type, extra: FieldSpec) -> tuple[FieldSpec, ...]:
    return (*cls.FIELDS, extra)


def test_a_new_field_in_a_record_is_caught(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = FieldSpec("priority", messages.Dispatch.FIELDS[0].kind, False, None, "new")
    monkeypatch.setattr(messages.Dispatch, "FIELDS", _with_field(messages.Dispatch, extra))
    assert _problems(doc, messages=spec.render_messages(spec.records_of(messages)))


@pytest.mark.parametrize("change", ["kind", "required", "default"])
def test_a_changed_field_type_flag_or_default_is_caught(doc: str, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    fields = list(messages.CreateRuntime.FIELDS)
    i = next(n for n, f in enumerate(fields) if f.name == "fetch")
    f = fields[i]
    fields[i] = {
        "kind": dataclasses.replace(f, kind=messages.Dispatch.FIELDS[2].kind),  # str
        "required": dataclasses.replace(f, required=True),
        "default": dataclasses.replace(f, default=True),
    }[change]
    monkeypatch.setattr(messages.CreateRuntime, "FIELDS", tuple(fields))
    assert _problems(doc, messages=spec.render_messages(spec.records_of(messages)))


@pytest.mark.parametrize("change", ["required", "default", "kind"])
def test_a_changed_common_field_is_caught(doc: str, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """A common field is named after its message, not given a row: a change of its flag, a
    default it gains, or another kind still shows."""
    fields = list(messages.Dispose.FIELDS)
    i = next(n for n, f in enumerate(fields) if f.name == "id")
    f = fields[i]
    fields[i] = {
        "required": dataclasses.replace(f, required=True),
        "default": dataclasses.replace(f, default=0),
        "kind": dataclasses.replace(f, kind=messages.Dispatch.FIELDS[2].kind),  # str
    }[change]
    monkeypatch.setattr(messages.Dispose, "FIELDS", tuple(fields))
    assert _problems(doc, messages=spec.render_messages(spec.records_of(messages)))


def test_a_type_added_to_a_link_is_caught(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = messages.CONTROL_TO_CLIENT
    wider = Link(ctl.name, {**ctl.types, "hello": (messages.Hello, ())}, ctl.replies)
    links = tuple(wider if link is ctl else link for link in messages.LINKS)
    monkeypatch.setattr(messages, "LINKS", links)
    assert _problems(doc, links=spec.render_links(messages.LINKS))


def test_a_required_field_added_to_a_link_is_caught(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    c2b = messages.CLIENT_TO_BROKER
    stricter = Link(c2b.name, {**c2b.types, "hello": (messages.Hello, ("id",))}, c2b.replies)
    monkeypatch.setattr(messages, "LINKS", tuple(stricter if link is c2b else link for link in messages.LINKS))
    assert _problems(doc, links=spec.render_links(messages.LINKS))


def test_a_changed_limit_is_caught(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    changed = tuple(
        dataclasses.replace(lim, value=lim.value + 1) if lim.name == "MAX_HEADER" else lim for lim in spec.LIMITS
    )
    monkeypatch.setattr(spec, "LIMITS", changed)
    assert _problems(doc, limits=spec.render_limits())
    assert any("MAX_HEADER" in p for p in spec.limit_problems())


@pytest.mark.parametrize(
    "place", ["daemon/bootstrap.js:NO_SUCH_CONSTANT", "wire.guest.NO_SUCH_CONSTANT", "daemon.no_such_module.X"]
)
def test_a_constant_gone_or_moved_is_caught(monkeypatch: pytest.MonkeyPatch, place: str) -> None:
    monkeypatch.setattr(spec, "LIMITS", (spec.Limit("GONE", 1, "", (place,), ""),))
    assert spec.limit_problems()
    with pytest.raises(LookupError):
        spec.code_value(place)


def test_a_changed_init_limit_is_caught(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest, "MAX_VALUE", guest.MAX_VALUE + 1)
    assert any("MAX_VALUE" in p for p in spec.limit_problems())
    fields = tuple(dataclasses.replace(f, default=f.default + 1) if f.name == "max_value" else f
                   for f in guest.Init.FIELDS)  # fmt: skip
    monkeypatch.setattr(guest.Init, "FIELDS", fields)
    assert _problems(doc, **{"guest-messages": spec.render_messages(spec.guest_records())})


def test_a_new_field_in_a_guest_record_is_caught(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = FieldSpec("deadline", INT, False, None, "new")
    monkeypatch.setattr(guest.Fetch, "FIELDS", _with_field(guest.Fetch, extra))
    assert _problems(doc, **{"guest-messages": spec.render_messages(spec.guest_records())})


def test_a_guest_op_added_to_a_direction_is_caught(doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(guest.GUEST_TO_DAEMON, "abort", guest.Abort)
    assert _problems(doc, **{"guest-links": spec.render_links(spec.guest_links())})


def test_a_guest_kind_without_a_meaning_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(spec.GUEST_KINDS, "guest body")
    with pytest.raises(KeyError, match="guest body"):
        spec.render_kinds(spec.guest_records(), spec.GUEST_KINDS)


def test_a_new_error_code_without_a_meaning_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "E_BRAND_NEW", "brand_new", raising=False)
    with pytest.raises(KeyError, match="brand_new"):
        spec.render_errors()


def test_a_removed_block_is_caught(doc: str, generated: dict[str, str]) -> None:
    edited = re.sub(r"<!-- generated: errors -->.*?<!-- end generated -->", "", doc, flags=re.DOTALL)
    assert any("missing" in p for p in _problems(edited, errors=generated["errors"]))


def test_write_mode_repairs_a_drifted_block(doc: str, generated: dict[str, str]) -> None:
    edited = doc.replace("| `resp_sid` | bin16 |", "| `resp_sid`? | bin16 |", 1)
    repaired = spec.write_text(edited, generated)
    assert spec.check_text(repaired, generated) == []


# ---- the citation check catches each kind of drift -------------------------------------------------

# Spelled in two parts so that this file does not cite the documents itself.
PROTOCOL, DESIGN = "protocol" + ".md", "docs/design" + ".md"


@pytest.mark.parametrize(
    ("text", "refs"),
    [
        (f"# see {PROTOCOL} 2.2 for refusals", [("protocol.md", "2.2")]),
        (f"(one counter: {PROTOCOL} section 7)", [("protocol.md", "7")]),
        (f'// {PROTOCOL}, "Guest channel".', [("protocol.md", "Guest channel")]),
        (f"error code ({PROTOCOL}, Error codes)", [("protocol.md", "Error codes")]),
        (f"the rule of {DESIGN}, Z5: a pending recv", [("design.md", "Z5")]),
        (f"# lost peers: {DESIGN} 2.13,\n# 2.14 and 3.1.", [("design.md", r) for r in ("2.13", "2.14", "3.1")]),
        (f"({PROTOCOL}, Appendix A.3)", [("protocol.md", "Appendix A.3")]),
        (f"{PROTOCOL} is the normative text; {PROTOCOL}'s tables; see {PROTOCOL}.", []),
    ],
)
def test_citations_are_parsed(text: str, refs: list[tuple[str, str]]) -> None:
    assert [(c.doc, c.ref) for c in spec.citations_in(text)] == refs


def _cite(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cites.py"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text",
    [
        f"# {PROTOCOL} 5.13",  # a section number that is gone
        f"# {PROTOCOL} section 10",
        f'# {PROTOCOL}, "Guest op table"',  # a title that is gone
        f"# {PROTOCOL}, guest ops",
        f"# {DESIGN}, Z99",
        f"# {PROTOCOL}, Appendix A.9",  # an appendix item that is gone
        f"# {DESIGN} 2.13,\n# 2.99 and 3.1",  # one of a list
    ],
)
def test_a_citation_of_a_missing_section_is_caught(tmp_path: Path, text: str) -> None:
    assert spec.citation_problems([_cite(tmp_path, text)])


def test_a_renumbered_document_breaks_its_citations(tmp_path: Path, doc: str) -> None:
    cites = _cite(tmp_path, f'# {PROTOCOL} 7.3, and {PROTOCOL}, "Limits"\n')
    documents = {"protocol.md": doc, "design.md": ""}
    assert spec.citation_problems([cites], documents) == []
    renumbered = doc.replace("### 7.3 Rules", "### 7.4 Rules").replace("## 9. Limits", "## 9. Bounds")
    assert len(spec.citation_problems([cites], {**documents, "protocol.md": renumbered})) == 2
