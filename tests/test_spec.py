"""protocol.md cannot drift from the code: its generated tables (message types per link, fields,
types, required flags, defaults, error codes, limits) must equal what ``wire.spec`` generates
from the records and constants, and every limit it states must equal the constant it names.

The second half checks the checker: each kind of drift, made on purpose in memory, is caught."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from wire import messages, protocol, spec
from wire.schema import FieldSpec, Link

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_MD = ROOT / "protocol.md"
MAX_PROTOCOL_MD = 32 * 1024


@pytest.fixture
def generated() -> dict[str, str | None]:
    return spec.render_all()


@pytest.fixture(scope="module")
def doc() -> str:
    return PROTOCOL_MD.read_text()


# ---- protocol.md against the code --------------------------------------------------------------


def test_protocol_md_is_at_most_32_kib(doc: str) -> None:
    size = len(doc.encode())
    assert size <= MAX_PROTOCOL_MD, f"protocol.md is {size} bytes; narrative belongs in docs/design.md"


def test_protocol_md_has_exactly_the_generated_blocks(doc: str) -> None:
    assert sorted(spec.blocks_in(doc)) == sorted(spec.BLOCKS)


@pytest.mark.parametrize("name", list(spec.BLOCKS))
def test_generated_block_matches_the_code(name: str, doc: str) -> None:
    want = spec.render(name)
    if want is None:
        pytest.skip(spec.UNAVAILABLE)
    have = spec.blocks_in(doc)[name]
    if have != want.strip():
        problems, _ = spec.check_text(doc, {name: want})
        pytest.fail("\n".join(problems) + "\n(regenerate with: python -m wire.spec --write protocol.md)")


@pytest.mark.parametrize(
    ("limit", "place"),
    [pytest.param(lim, place, id=f"{lim.name}@{place}") for lim in spec.LIMITS for place in lim.places],
)
def test_stated_limit_equals_the_constant(limit: spec.Limit, place: str) -> None:
    try:
        value = spec.code_value(place)
    except spec.NotInTree as exc:
        pytest.skip(f"{limit.name}: {exc}")
    assert value == limit.value, f"protocol.md states {limit.name} = {limit.value!r}; {place} is {value!r}"


def test_every_error_code_has_one_meaning() -> None:
    codes = [code for _, code in spec.error_codes()]
    assert len(codes) == len(set(codes))
    assert sorted(spec.ERRORS) == sorted(codes)


def test_every_field_kind_has_a_meaning() -> None:
    kinds = {spec._kind_name(f) for cls in spec.records_of(messages) for f in cls.FIELDS}
    assert kinds <= set(spec.KINDS)


def test_check_mode_passes_on_protocol_md(capsys: pytest.CaptureFixture[str]) -> None:
    assert spec.main(["--check", str(PROTOCOL_MD)]) == 0, capsys.readouterr().err


def _code_files() -> list[Path]:
    skip = {"__pycache__", "node_modules", "venv"}
    return [
        p
        for pattern in ("*.py", "*.js")
        for p in ROOT.rglob(pattern)
        if not any(part.startswith(".") or part in skip for part in p.relative_to(ROOT).parts)
    ]


def test_no_code_cites_a_document_outside_the_repository() -> None:
    needle = "notes-zeromq"
    here = Path(__file__).resolve()  # names it, to check for it
    citing = [
        str(p.relative_to(ROOT))
        for p in _code_files()
        if p.resolve() != here and needle in p.read_text(errors="replace")
    ]
    assert not citing, f"cite docs/design.md instead: {citing}"


# ---- the checker catches each kind of drift --------------------------------------------------------


def _problems(doc: str, **blocks: str | None) -> list[str]:
    return spec.check_text(doc, blocks)[0]


def test_a_changed_field_meaning_in_the_document_is_caught(doc: str, generated: dict[str, str | None]) -> None:
    assert "| `resp_sid` | bin16 | yes |" in doc
    edited = doc.replace("| `resp_sid` | bin16 | yes |", "| `resp_sid` | bin16 | no |", 1)
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
    assert any("MAX_HEADER" in p for p in spec.limit_problems()[0])


def test_a_constant_gone_from_the_bootstrap_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    lim = spec.Limit("GONE", 1, "", ("daemon/bootstrap.js:NO_SUCH_CONSTANT",), "")
    monkeypatch.setattr(spec, "LIMITS", (lim,))
    assert spec.limit_problems()[0]


def test_a_new_error_code_without_a_meaning_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "E_BRAND_NEW", "brand_new", raising=False)
    with pytest.raises(KeyError, match="brand_new"):
        spec.render_errors()


def test_a_removed_block_is_caught(doc: str, generated: dict[str, str | None]) -> None:
    edited = re.sub(r"<!-- generated: errors -->.*?<!-- end generated -->", "", doc, flags=re.DOTALL)
    assert any("missing" in p for p in _problems(edited, errors=generated["errors"]))


def test_write_mode_repairs_a_drifted_block(doc: str, generated: dict[str, str | None]) -> None:
    edited = doc.replace("| `resp_sid` | bin16 | yes |", "| `resp_sid` | bin16 | no |", 1)
    repaired = spec.write_text(edited, generated)
    assert spec.check_text(repaired, generated)[0] == []
