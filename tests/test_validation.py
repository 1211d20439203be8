"""The one rule per concept (mmprm_tasks.validation), fuzzed: ids as the CLI, the DAG Params and
object keys read them; text and numbers as every JSON reader of the platform reads them."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

from mmprm_tasks.params import TRIGGER_PARAMS
from mmprm_tasks.storage import check_key
from mmprm_tasks.validation import ID_PATTERN, find_bad_value, id_problem, load_json, text_problem

ID_PARAMS = [name for name, (_, schema) in TRIGGER_PARAMS.items() if schema.get("pattern") == ID_PATTERN]
# Text a hostile file or user sends: every control character, escapes, surrogates, dots and slashes.
hostile_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["..", ".", "a/b", "a\nb", "a\n", "\x1b[2J", "\x9b", "\x00", "\ud800", "ok", "x" * 201, "p-1:a@b+c=d_e.f"])


def test_every_id_param_carries_the_one_rule():
    assert {"annotation_run_id", "dataset_id", "checkpoint_id"} <= set(ID_PARAMS)


@hsettings(max_examples=300, deadline=None)
@given(hostile_text)
@example("..")
@example("a\n")
def test_an_id_the_rule_accepts_is_a_safe_key_and_the_params_agree(value):
    accepted = id_problem(value) is None
    if accepted:
        assert check_key(f"trees/{value}/{value}.json") and text_problem(value) is None
        assert value not in (".", "..") and "/" not in value and len(value) <= 200
    for name in ID_PARAMS:
        schema = {k: v for k, v in TRIGGER_PARAMS[name][1].items() if k not in ("title", "description")}
        try:
            jsonschema.validate(value, schema)
            schema_accepts = True
        except jsonschema.ValidationError:
            schema_accepts = False
        # JSON schema's "$" (Python's re.search) also matches before a final newline; the stage
        # refuses such an id with the rule itself (check_id in shard_run), so only that may differ.
        assert schema_accepts == accepted or (schema_accepts and value.endswith("\n")), (name, value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | hostile_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4),
    max_leaves=20)


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.booleans())
@example({"\r": None}, False)  # a short escape (\r, \b, \f) of a forbidden character: once missed
@example(["\b\f"], True)
def test_load_json_finds_exactly_what_the_full_walk_finds(value, ascii_only):
    """The scan that lets clean records skip the walk never lets a bad value through."""
    try:
        data = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", errors="surrogatepass")
    except (ValueError, UnicodeEncodeError):
        return
    try:
        parsed, bad = load_json(data)
    except (ValueError, UnicodeDecodeError):  # a lone surrogate written raw is not UTF-8: refused whole
        assert not ascii_only
        return
    walked = find_bad_value(parsed)
    assert (bad is None) == (walked is None)
    if bad is not None:
        assert (bad.field, bad.message) == (walked.field, walked.message)


@pytest.mark.parametrize("text, allowed", [("line one\nline two\tcolumn", True), ("bell\x07", False),
                                           ("\x1b[31mred", False), ("csi\x9b", False), ("del\x7f", False),
                                           ("\u00e9\u4e2d", True), ("nul\x00", False), ("\ud800", False)])
def test_the_text_rule_allows_only_newline_and_tab_among_controls(text, allowed):
    assert (text_problem(text) is None) == allowed
