"""``mmprm stack up --user NAME:ROLE``: the specs it accepts and where each password comes from
(the stack itself is started in tests/airflow/test_stack_up.py)."""

from __future__ import annotations

import pytest

from mmprm_tasks.airflow_stack import ROLES, parse_users


def test_users_get_the_file_password_or_a_generated_one():
    users = parse_users(["vera:viewer", "olga:op"], {"olga": "olga-pw", "someone": "x"})
    assert users["olga"] == ("op", "olga-pw")
    role, generated = users["vera"]
    assert role == "viewer" and len(generated) >= 16
    assert parse_users(["vera:viewer"])["vera"][1] != generated  # generated afresh
    assert set(ROLES) == {"viewer", "user", "op", "admin"}


@pytest.mark.parametrize("spec", ["vera", "vera:", ":viewer", "vera:reader", "admin:viewer"])
def test_malformed_or_clashing_users_are_refused(spec):
    with pytest.raises(ValueError, match="--user"):
        parse_users([spec])


def test_a_user_given_twice_is_refused():
    with pytest.raises(ValueError, match="given twice"):
        parse_users(["vera:viewer", "vera:op"])
