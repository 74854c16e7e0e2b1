"""The pure lock machine: rules, messages and invariants (no I/O, injected clock)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lock_ioc.config import parse
from lock_ioc.machine import DISABLED, FREE, HELD, LockMachine, LockState
from lock_ioc.requests import Refused

CONFIG = parse({
    "lease": {"default": 60, "max": 600},
    "groups": {
        "queue": {"users": ["bluesky"]},
        "staff": {"users": ["alice", "bob"]},
        "beamhost": {"users": ["carol"], "hosts": ["ws1"]},
        "operator": {"users": ["operator"], "operator": True},
    },
}, base_dir=Path("/tmp"), source="test")
M = LockMachine(CONFIG)
T0 = 1_800_000_000.0
ALICE, BOB, QUEUE, OPER, NOBODY = ("alice@ws1", "bob@ws2", "bluesky@srv", "operator@cr",
                                   "mallory@ws1")


def run(state, name, caller, text, now=T0):
    return M.command(name, state, caller, text.encode(), now)


def test_acquire_free_grants_with_token_and_lease():
    out = run(LockState(), "Acquire", ALICE, '{"session": "scan1", "lease": 30, "note": "align"}')
    s = out.state
    assert (s.mode, s.owner, s.session, s.note, s.token, s.expiry) == (
        HELD, ALICE, "scan1", "align", 1, T0 + 30)
    assert "granted to alice@ws1" in out.message and "token 1" in out.message
    assert [e.kind for e in out.events] == ["acquired"]


def test_bare_session_name_uses_default_lease():
    s = run(LockState(), "Acquire", ALICE, "scan1").state
    assert s.expiry == T0 + 60 and s.note == ""


def test_same_identity_and_session_renews_without_new_token():
    s = run(LockState(), "Acquire", ALICE, "scan1").state
    out = run(s, "Acquire", ALICE, '{"session": "scan1", "lease": 10}', T0 + 5)
    assert out.state.token == 1 and out.state.expiry == T0 + 15
    assert out.events[0].kind == "renewed"


@pytest.mark.parametrize("caller,text", [(BOB, "scan1"), (ALICE, "other"), (QUEUE, "queue")])
def test_acquire_refused_while_held_names_holder(caller, text):
    s = run(LockState(), "Acquire", ALICE, '{"session": "scan1", "note": "align mono"}').state
    with pytest.raises(Refused) as err:
        run(s, "Acquire", caller, text, T0 + 1)
    assert "held by alice@ws1 (session scan1, note 'align mono')" in err.value.message
    assert "59 s left" in err.value.message


def test_caller_in_no_group_is_refused():
    with pytest.raises(Refused, match="mallory@ws1 is in no access group"):
        run(LockState(), "Acquire", NOBODY, "x")


def test_host_restricted_group():
    assert run(LockState(), "Acquire", "carol@ws1", "c").state.mode == HELD
    with pytest.raises(Refused, match="no access group"):
        run(LockState(), "Acquire", "carol@elsewhere", "c")


def test_renew_and_release_only_by_holder():
    s = run(LockState(), "Acquire", ALICE, "scan1").state
    for caller, session in [(BOB, "scan1"), (ALICE, "scan2")]:
        for cmd in ("Renew", "Release"):
            with pytest.raises(Refused, match="do not hold the lock"):
                run(s, cmd, caller, session)
    renewed = run(s, "Renew", ALICE, '{"session": "scan1", "lease": 5}', T0 + 1).state
    assert renewed.expiry == T0 + 6 and renewed.lease == 5
    bare = run(renewed, "Renew", ALICE, "scan1", T0 + 2).state
    assert bare.expiry == T0 + 7, "a bare renew keeps the current lease length"
    freed = run(bare, "Release", ALICE, "scan1", T0 + 3)
    assert freed.state == LockState(token=1) and freed.events[0].kind == "released"


def test_expiry_frees_and_blocks_late_renew():
    s = run(LockState(), "Acquire", ALICE, '{"session": "s", "lease": 2}').state
    assert M.expire(s, T0 + 1.9) is None
    out = M.expire(s, T0 + 2)
    assert out.state.mode == FREE and out.state.token == 1 and out.events[0].kind == "expired"
    with pytest.raises(Refused, match="not held") as err:
        run(s, "Renew", ALICE, "s", T0 + 3)
    assert err.value.pending.events[0].kind == "expired"


def test_force_release_operators_only_with_reason():
    s = run(LockState(), "Acquire", ALICE, "scan1").state
    with pytest.raises(Refused, match="only operators"):
        run(s, "ForceRelease", BOB, "because")
    with pytest.raises(Refused, match="reason is required"):
        run(s, "ForceRelease", OPER, "  ")
    out = run(s, "ForceRelease", OPER, "hutch search")
    assert out.state == LockState(token=1)
    assert "holder=alice@ws1" in out.events[0].detail and "hutch search" in out.events[0].detail


def test_disable_enable_and_gates():
    assert M.gates(LockState()) == {"queue": 1, "staff": 1, "beamhost": 1, "operator": 1}
    held = run(LockState(), "Acquire", ALICE, "scan1").state
    assert M.gates(held) == {"queue": 0, "staff": 1, "beamhost": 0, "operator": 0}
    out = run(held, "Disable", OPER, "maintenance")
    assert out.state.mode == DISABLED and "maintenance" in out.state.reason
    assert [e.kind for e in out.events] == ["force-released", "disabled"]
    assert M.gates(out.state) == {"queue": 0, "staff": 0, "beamhost": 0, "operator": 1}
    with pytest.raises(Refused, match="disabled"):
        run(out.state, "Acquire", OPER, "op")
    with pytest.raises(Refused, match="only operators"):
        run(out.state, "Enable", ALICE, "")
    assert run(out.state, "Enable", OPER, "").state == LockState(token=1)


@pytest.mark.parametrize("text,why", [
    ("{not json", "invalid JSON"),
    ('{"session": "s", "color": 1}', "unknown key 'color'"),
    ('{"lease": 5}', 'needs a "session"'),
    ('["s"]', "session name or a JSON object"),
    ("", "session name is empty"),
    ("x" * 65, "session name too long"),
    ("bad name", "invalid session name"),
    ('{"session": "s", "lease": "ten"}', "lease must be a number"),
    ('{"session": "s", "lease": -1}', "positive"),
    ('{"session": "s", "lease": 0}', "positive"),
    ('{"session": "s", "lease": 1e308}', "over the maximum of 600 s"),
    ('{"session": "s", "lease": NaN}', "invalid JSON"),
    ('{"session": "s", "lease": 601}', "over the maximum of 600 s"),
    ('{"session": "s", "note": 5}', "note must be a string"),
    ('{"session": 7}', "session must be a string"),
    ("a\x01b", "control characters"),
])
def test_bad_acquire_input_is_refused_clearly(text, why):
    with pytest.raises(Refused) as err:
        run(LockState(), "Acquire", ALICE, text)
    assert why in err.value.message and err.value.message.startswith("Acquire: ")


def test_non_utf8_is_refused():
    with pytest.raises(Refused, match="not valid UTF-8"):
        M.command("Acquire", LockState(), ALICE, b"ab\xff", T0)


# ---- invariants under random command sequences ------------------------------------
CALLERS = st.sampled_from([ALICE, BOB, QUEUE, OPER, NOBODY, "carol@ws1"])
SESSIONS = st.sampled_from(["s1", "s2", "queue", ""])
TEXTS = st.one_of(
    SESSIONS,
    st.builds(lambda s, l, n: json.dumps({"session": s, "lease": l, "note": n}),
              SESSIONS, st.one_of(st.integers(-5, 700), st.floats(allow_nan=False)),
              st.text(max_size=20)),
    st.text(max_size=30),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)
STEP = st.tuples(st.sampled_from(["Acquire", "Renew", "Release", "ForceRelease", "Disable",
                                  "Enable", "tick"]), CALLERS, TEXTS,
                 st.floats(min_value=0, max_value=40))


@settings(max_examples=300, deadline=None)
@given(st.lists(STEP, max_size=40))
def test_invariants_hold_for_any_command_sequence(steps):
    state, now, token = LockState(), T0, 0
    for name, caller, text, dt in steps:
        now += dt
        try:
            if name == "tick":
                out = M.expire(state, now)
                if out is None:
                    continue
            else:
                out = M.command(name, state, caller, text.encode("utf-8", "surrogatepass")
                                if isinstance(text, str) else text, now)
        except Refused as exc:
            assert exc.message
            pending = getattr(exc, "pending", None)
            if pending is None:
                continue  # refused: nothing changed
            out = pending
        new = out.state
        assert new.token >= token, "token never decreases"
        assert new.token <= token + 1, "at most one grant per command"
        if new.mode == HELD:
            assert new.owner and new.session and new.expiry > now - 1e-9
            user, _, host = new.owner.rpartition("@")
            assert CONFIG.groups_of(user, host), "holder is in a group"
        else:
            assert (new.owner, new.session, new.expiry) == ("", "", 0.0)
        gates = M.gates(new)
        if new.mode == FREE:
            assert all(gates.values())
        elif new.mode == DISABLED:
            assert gates == {g.name: int(g.operator) for g in CONFIG.groups}
        else:
            assert any(gates.values())
        state, token = new, new.token


def test_refusals_of_free_and_disabled_locks_say_what_is_wrong_in_plain_words():
    with pytest.raises(Refused) as err:
        run(LockState(), "Release", ALICE, "scan1")
    assert err.value.message == ("Release: refused: the lock is not held (it is Free): "
                                 "nothing to release")
    with pytest.raises(Refused) as err:
        run(LockState(), "Renew", ALICE, "scan1")
    assert err.value.message == ("Renew: refused: the lock is not held (it is Free): "
                                 "acquire it again (a lease that ran out cannot be renewed)")
    disabled = run(LockState(), "Disable", OPER, "maintenance").state
    with pytest.raises(Refused) as err:
        run(disabled, "Disable", OPER, "again")
    assert err.value.message == ("Disable: refused: the lock is already disabled "
                                 "(by operator@cr: maintenance)")
