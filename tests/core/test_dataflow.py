"""Input templates: what `render` builds, and how a bad path fails."""

from __future__ import annotations

from typing import Any

import pytest

from saga.core.dataflow import ResolveError, references, render

SAGA_INPUT: dict[str, Any] = {
    "order": {"id": "o-1", "total": 12.5, "lines": [{"sku": "pasta"}, {"sku": "wine"}]},
    "customer": "ada",
    "flags": [True, False],
    "empty": {},
    "nothing": None,
}
OUTPUTS: dict[str, Any] = {
    "payment": {"charge": {"id": "ch-9", "amount": 12.5}, "receipts": ["r1", "r2"]},
    "kitchen": {},
}


def _render(template: Any) -> Any:
    return render(template, saga_id="saga-42", saga_input=SAGA_INPUT, outputs=OUTPUTS)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("$.input", SAGA_INPUT),
        ("$.input.customer", "ada"),
        ("$.input.order.total", 12.5),
        ("$.input.order.lines.1.sku", "wine"),
        ("$.input.order.lines.0", {"sku": "pasta"}),
        ("$.input.flags.1", False),
        ("$.input.empty", {}),
        ("$.input.nothing", None),
        ("$.steps.payment.output", OUTPUTS["payment"]),
        ("$.steps.payment.output.charge.id", "ch-9"),
        ("$.steps.payment.output.receipts.0", "r1"),
        ("$.steps.kitchen.output", {}),
        ("$.saga_id", "saga-42"),
    ],
)
def test_references(template: str, expected: Any) -> None:
    assert _render(template) == expected


@pytest.mark.parametrize(
    "literal",
    [0, 1.5, True, False, "plain", "", "$", "$input", "price in $.input", "$ .input", "$$.input"],
)
def test_literals_pass_through(literal: Any) -> None:
    assert _render(literal) == literal
    assert _render({"k": literal}) == {"k": literal}


def test_nested_dicts_and_lists() -> None:
    template = {
        "order": "$.input.order.id",
        "who": {"name": "$.input.customer", "saga": "$.saga_id", "vip": False},
        "lines": ["$.input.order.lines.0.sku", "$.input.order.lines.1.sku", "bread", 3],
        "charge": [
            {"id": "$.steps.payment.output.charge.id"},
            ["$.steps.payment.output.receipts.1"],
        ],
    }
    assert _render(template) == {
        "order": "o-1",
        "who": {"name": "ada", "saga": "saga-42", "vip": False},
        "lines": ["pasta", "wine", "bread", 3],
        "charge": [{"id": "ch-9"}, ["r2"]],
    }


@pytest.mark.parametrize("template", [{"coupon": None}, ["$.input.customer", None]])
def test_null_inside_a_template_is_a_literal(template: Any) -> None:
    rendered = _render(template)
    assert rendered == ({"coupon": None} if isinstance(template, dict) else ["ada", None])


def test_tuples_render_as_lists() -> None:
    assert _render(("$.input.customer", 1)) == ["ada", 1]


def test_none_template_passes_the_saga_input() -> None:
    rendered = _render(None)
    assert rendered == SAGA_INPUT
    assert rendered is not SAGA_INPUT  # a copy: the step cannot change the saga's input


def test_render_does_not_change_its_arguments() -> None:
    template = {"a": ["$.input.customer"], "b": "$.steps.payment.output.charge"}
    before = repr((template, SAGA_INPUT, OUTPUTS))
    _render(template)
    assert repr((template, SAGA_INPUT, OUTPUTS)) == before


@pytest.mark.parametrize(
    ("template", "path", "detail"),
    [
        ("$.input.nope", "$.input.nope", "'nope'"),
        ("$.input.order.lines.2", "$.input.order.lines.2", "'2'"),
        ("$.input.order.lines.-1", "$.input.order.lines.-1", "'-1'"),
        ("$.input.order.lines.first", "$.input.order.lines.first", "'first'"),
        ("$.input.customer.name", "$.input.customer.name", "'name'"),
        ("$.input.nothing.x", "$.input.nothing.x", "'x'"),
        ("$.steps.payment.output.refund", "$.steps.payment.output.refund", "'refund'"),
        ("$.steps.rider.output.id", "$.steps.rider.output.id", "'rider'"),
        ("$.steps.payment", "$.steps.payment", "unknown reference"),
        ("$.steps.payment.input", "$.steps.payment.input", "unknown reference"),
        ("$.saga_id.x", "$.saga_id.x", "unknown reference"),
        ("$.inputs", "$.inputs", "unknown reference"),
        ("$.", "$.", "unknown reference"),
    ],
)
def test_missing_paths_raise_resolve_error_naming_the_path(
    template: str, path: str, detail: str
) -> None:
    with pytest.raises(ResolveError) as caught:
        _render(template)
    assert str(caught.value).startswith(f"{path}:")
    assert detail in str(caught.value)


def test_a_missing_path_deep_in_a_template_is_named() -> None:
    with pytest.raises(ResolveError, match=r"^\$\.input\.order\.tax: no 'tax'"):
        _render({"a": [1, {"b": "$.input.order.tax"}]})


def test_step_output_before_it_exists() -> None:
    with pytest.raises(ResolveError, match="step 'payment' has no output yet"):
        render("$.steps.payment.output", saga_id="s", saga_input={}, outputs={})


def test_references_lists_every_reference() -> None:
    template = {
        "a": "$.input.order.id",
        "b": ["$.steps.payment.output.charge.id", ("$.saga_id",)],
        "c": {"d": "$.steps.kitchen"},
        "e": "$.elsewhere.x",
        "f": "not a reference",
        "g": 7,
    }
    assert sorted(references(template)) == [
        ("elsewhere", "x"),
        ("input", "order.id"),
        ("saga_id", ""),
        ("steps.kitchen", ""),
        ("steps.payment", "output.charge.id"),
    ]
    assert references(None) == []
    assert references("$.input") == [("input", "")]
