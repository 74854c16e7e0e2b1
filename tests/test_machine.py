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


# ---- requests, hand-over, authority (issue 18) ---------------------------------------
from lock_ioc.machine import MAX_WAITERS, Waiter  # noqa: E402

RANKED = parse({
    "lease": {"default": 60, "max": 600},
    "groups": {
        "queue": {"users": ["bluesky"], "authority": 10, "unattended": True},
        "staff": {"users": ["alice", "bob", "dave"], "authority": 20},
        "beamhost": {"users": ["carol"], "hosts": ["ws1"], "authority": 20},
        "operator": {"users": ["operator"], "operator": True, "authority": 30},
    },
}, base_dir=Path("/tmp"), source="ranked")
R = LockMachine(RANKED)
DAVE, CAROL = "dave@ws3", "carol@ws1"


def rr(state, name, caller, text, now=T0):
    return R.command(name, state, caller, text.encode(), now)


def line(state):
    return [(w.who, w.session) for w in R.ordered(state)]


def held_by(who, session="s", text=None, machine=R):
    return machine.command("Acquire", LockState(), who, (text or session).encode(), T0).state


def test_request_on_a_free_lock_grants_it_at_once():
    out = rr(LockState(), "Request", BOB, '{"session": "b", "note": "mono", "lease": 30}')
    s = out.state
    assert (s.mode, s.owner, s.session, s.note, s.token, s.expiry, s.acquired) == (
        HELD, BOB, "b", "mono", 1, T0 + 30, T0)
    assert s.waiters == () and out.message.startswith("Request: granted to bob@ws2")


def test_request_waits_in_line_and_says_the_place():
    s = held_by(ALICE)
    out = rr(s, "Request", BOB, '{"session": "b", "note": "mono"}', T0 + 1)
    assert out.state.owner == ALICE and line(out.state) == [(BOB, "b")]
    assert "place 1 of 1" in out.message and "held by alice@ws1" in out.message
    assert [e.kind for e in out.events] == ["requested"]
    out2 = rr(out.state, "Request", DAVE, "d", T0 + 2)
    assert "place 2 of 2, after bob@ws2" in out2.message
    assert json.loads(R.waiters_json(out2.state)) == [
        {"who": BOB, "session": "b", "note": "mono", "since": T0 + 1, "expiry": T0 + 61,
         "lease": 60.0, "auto": True, "authority": 20, "group": "staff"},
        {"who": DAVE, "session": "d", "note": "", "since": T0 + 2, "expiry": T0 + 62,
         "lease": 60.0, "auto": True, "authority": 20, "group": "staff"}]


def test_request_again_renews_and_keeps_the_place():
    s = rr(held_by(ALICE), "Request", BOB, "b", T0 + 1).state
    s = rr(s, "Request", DAVE, "d", T0 + 2).state
    out = rr(s, "Request", BOB, '{"session": "b", "lease": 100, "note": "later"}', T0 + 50)
    assert line(out.state) == [(BOB, "b"), (DAVE, "d")]
    bob = R.head(out.state)
    assert (bob.since, bob.expiry, bob.note) == (T0 + 1, T0 + 150, "later")
    assert out.events[0].kind == "request-renewed" and "renewed for bob@ws2" in out.message


def test_request_refusals():
    with pytest.raises(Refused, match="mallory@ws1 is in no access group"):
        rr(held_by(ALICE), "Request", NOBODY, "m")
    with pytest.raises(Refused, match="you \\(alice@ws1\\) hold the lock; renew it"):
        rr(held_by(ALICE), "Request", ALICE, "s")
    with pytest.raises(Refused, match="under session s: release it or hand it over first"):
        rr(held_by(ALICE), "Request", ALICE, "other")
    with pytest.raises(Refused, match="Request: unknown key 'to'"):
        rr(held_by(ALICE), "Request", BOB, '{"session": "b", "to": "x"}')
    with pytest.raises(Refused, match="auto must be true or false"):
        rr(held_by(ALICE), "Request", BOB, '{"session": "b", "auto": "yes"}')
    disabled = rr(LockState(), "Disable", OPER, "beam off").state
    with pytest.raises(Refused, match="Request: refused: lock is disabled"):
        rr(disabled, "Request", BOB, "b")


def test_line_is_bounded():
    s = held_by(OPER)
    for i in range(MAX_WAITERS):
        s = rr(s, "Request", BOB, f"b{i}").state
    with pytest.raises(Refused, match=f"{MAX_WAITERS} requests are waiting already"):
        rr(s, "Request", DAVE, "d")


def test_withdraw_leaves_the_line():
    s = rr(held_by(ALICE), "Request", BOB, "b").state
    out = rr(s, "Withdraw", BOB, "b", T0 + 1)
    assert out.state.waiters == () and out.events[0].kind == "withdrawn"
    with pytest.raises(Refused, match="you \\(bob@ws2, session b\\) have no request waiting"):
        rr(out.state, "Withdraw", BOB, "b")


def test_handover_to_the_first_in_line_is_one_step_with_a_new_token():
    s = rr(held_by(ALICE), "Request", BOB, '{"session": "b", "note": "mono", "lease": 40}',
           T0 + 1).state
    s = rr(s, "Request", DAVE, "d", T0 + 2).state
    out = rr(s, "Handover", ALICE, "s", T0 + 5)
    new = out.state
    assert (new.mode, new.owner, new.session, new.note, new.token, new.expiry,
            new.acquired) == (HELD, BOB, "b", "mono", 2, T0 + 45, T0 + 5)
    assert line(new) == [(DAVE, "d")]
    assert [e.kind for e in out.events] == ["handed-over", "acquired"]
    assert "to=bob@ws2 to_session=b token=2" in out.events[0].detail
    assert "handed over by alice@ws1 (session s, token 1)" in out.events[1].detail
    assert R.gates(new)["staff"] == 1 and R.holder_index(new) == RANKED.user_index("bob")


def test_handover_to_a_named_waiter_and_requeue():
    s = rr(held_by(ALICE, text='{"session": "s", "note": "align", "lease": 90}'),
           "Request", BOB, "b", T0 + 1).state
    s = rr(s, "Request", DAVE, "d", T0 + 2).state
    out = rr(s, "Handover", ALICE, '{"session": "s", "to": "dave", "requeue": true}', T0 + 3)
    assert out.state.owner == DAVE and out.state.token == 2
    assert line(out.state) == [(BOB, "b"), (ALICE, "s")]
    back = out.state.waiters[-1]
    assert (back.note, back.lease, back.expiry, back.auto) == ("align", 90, T0 + 93, True)
    by_identity = rr(s, "Handover", ALICE, '{"session": "s", "to": "dave@ws3", '
                     '"to_session": "d"}', T0 + 3)
    assert by_identity.state.owner == DAVE


@pytest.mark.parametrize("text, why", [
    ('{"session": "s", "to": "mallory"}', "mallory is not waiting for the lock "
                                          "(waiting: bob@ws2 (session b))"),
    ('{"session": "s", "to": "alice"}', "you (alice@ws1) hold the lock already"),
    ('{"session": "s", "to": "alice@ws1"}', "you (alice@ws1) hold the lock already"),
    ('{"session": "s", "to": "bob", "to_session": "x"}', "bob (session x) is not waiting"),
    ('{"session": "s", "to": "bob here"}', '"to" must name a waiter as user@host or user'),
    ('{"session": "s", "to_session": "x"}', '"to_session" needs "to"'),
    ('{"session": "s", "requeue": 1}', "requeue must be true or false"),
    ('{"session": "other"}', "do not hold the lock"),
])
def test_handover_refusals_change_nothing(text, why):
    s = rr(held_by(ALICE), "Request", BOB, "b").state
    with pytest.raises(Refused) as err:
        rr(s, "Handover", ALICE, text, T0 + 1)
    assert why in err.value.message and err.value.message.startswith("Handover: ")


def test_handover_that_would_not_stay_with_the_target_is_refused():
    s = held_by(QUEUE, text='{"session": "queue", "task": "scan"}')
    s = rr(s, "Request", ALICE, "a").state
    s = rr(s, "Request", OPER, "op").state
    with pytest.raises(Refused, match="operator@cr \\(operator \\(authority 30\\)\\) waits too "
                                      "and would take the lock at once from alice@ws1"):
        rr(s, "Handover", QUEUE, '{"session": "queue", "to": "alice"}')
    s = rr(held_by(OPER), "Request", ALICE, "a").state
    with pytest.raises(Refused, match="with requeue you \\(operator \\(authority 30\\)\\) would "
                                      "take the lock back at once from alice@ws1"):
        rr(s, "Handover", OPER, '{"session": "s", "requeue": true}')
    assert rr(s, "Handover", OPER, "s").state.owner == ALICE


def test_handover_needs_the_holder_and_a_waiter():
    with pytest.raises(Refused, match="nobody is waiting for the lock; Release it instead"):
        rr(held_by(ALICE), "Handover", ALICE, "s")
    s = rr(held_by(ALICE), "Request", BOB, "b").state
    with pytest.raises(Refused, match="you \\(bob@ws2, session b\\) do not hold the lock"):
        rr(s, "Handover", BOB, "b")
    with pytest.raises(Refused, match="not held \\(it is Free\\): nothing to hand over"):
        rr(LockState(), "Handover", ALICE, "s")


def test_handover_to_a_waiter_whose_request_lapsed_is_refused_saying_so():
    s = rr(held_by(ALICE, text='{"session": "s", "lease": 600}'), "Request", BOB,
           '{"session": "b", "lease": 10}').state
    assert R.deadline(s) == T0 + 10
    with pytest.raises(Refused) as err:
        rr(s, "Handover", ALICE, '{"session": "s", "to": "bob"}', T0 + 11)
    assert "bob is not waiting" in err.value.message
    assert "the request of bob@ws2, session b, lapsed" in err.value.message
    assert [e.kind for e in err.value.pending.events] == ["request-lapsed"]
    # The clock drops it on its own too, with an event.
    out = R.expire(s, T0 + 10)
    assert out.state.waiters == () and out.events[0].kind == "request-lapsed"
    assert out.state.owner == ALICE


def test_release_with_waiters_hands_over_if_asked_and_says_who_waits():
    s = rr(held_by(ALICE), "Request", BOB, "b", T0 + 1).state
    s = rr(s, "Request", DAVE, '{"session": "d", "auto": false}', T0 + 2).state
    out = rr(s, "Release", ALICE, "s", T0 + 3)
    assert [e.kind for e in out.events] == ["released", "acquired"]
    assert out.events[0].detail == "waiting=bob@ws2/b,dave@ws3/d"
    assert (out.state.owner, out.state.token) == (BOB, 2)
    assert "first in line, the lock was free" in out.events[1].detail
    # dave asked not to be given the lock: it is Free, reserved for him.
    out = rr(out.state, "Release", BOB, "b", T0 + 4)
    assert out.state.mode == FREE and line(out.state) == [(DAVE, "d")]
    with pytest.raises(Refused, match="reserved for dave@ws3 \\(session d\\), first of 1"):
        rr(out.state, "Acquire", ALICE, "s", T0 + 5)
    queued = rr(out.state, "Request", ALICE, "s", T0 + 5)
    assert queued.state.mode == FREE and "reserved for dave@ws3" in queued.message
    taken = rr(out.state, "Acquire", DAVE, "d", T0 + 5).state
    assert (taken.owner, taken.waiters, taken.token) == (DAVE, (), 3)


def test_reserved_lock_queues_a_request_behind_the_first():
    s = rr(held_by(ALICE), "Request", DAVE, '{"session": "d", "auto": false}').state
    s = rr(s, "Release", ALICE, "s", T0 + 1).state
    out = rr(s, "Request", BOB, "b", T0 + 2)
    assert out.state.mode == FREE and line(out.state) == [(DAVE, "d"), (BOB, "b")]
    # A higher authority is first in line: takes a reserved lock at once.
    out = rr(out.state, "Request", OPER, "op", T0 + 3)
    assert out.state.owner == OPER and line(out.state) == [(DAVE, "d"), (BOB, "b")]


def test_higher_authority_request_takes_the_lock_at_once():
    out = rr(held_by(ALICE), "Request", OPER, '{"session": "op", "note": "beam dump"}',
             T0 + 1)
    assert (out.state.owner, out.state.token, out.state.note) == (OPER, 2, "beam dump")
    assert [e.kind for e in out.events] == ["requested", "preempted", "acquired"]
    assert "holder=alice@ws1 session=s operator (authority 30) over staff (authority 20)" in \
        out.events[1].detail
    # Equal or lower authority waits.
    assert rr(held_by(ALICE), "Request", CAROL, "c").state.owner == ALICE
    assert rr(held_by(ALICE), "Request", QUEUE, "queue").state.owner == ALICE


def test_the_queue_running_a_task_yields_at_its_end_not_at_once():
    s = held_by(QUEUE, text='{"session": "queue", "task": "scan"}')
    assert s.task == "scan"
    out = rr(s, "Request", ALICE, '{"session": "a", "note": "align"}', T0 + 1)
    assert out.state.owner == QUEUE and R.yield_to(out.state) == ALICE
    assert "running task 'scan': it hands over to you at its end" in out.message
    # Lower or equal: no yield.
    assert R.yield_to(rr(s, "Request", "bluesky@other", "q2").state) == ""
    # The end of the task: the guard hands over and waits in line for the lock again.
    done = rr(out.state, "Handover", QUEUE, '{"session": "queue", "requeue": true}', T0 + 5)
    assert done.state.owner == ALICE and line(done.state) == [(QUEUE, "queue")]
    assert R.yield_to(done.state) == ""
    # alice releases: the queue has it back.
    back = rr(done.state, "Release", ALICE, "a", T0 + 9).state
    assert (back.owner, back.session, back.token, back.task) == (QUEUE, "queue", 3, "")
    # Without a task (between plans), the same request takes the lock at once.
    idle = rr(s, "Renew", QUEUE, '{"session": "queue", "task": ""}', T0 + 1).state
    assert rr(idle, "Request", ALICE, "a", T0 + 2).state.owner == ALICE
    # Clearing the task with a higher request waiting grants it then.
    cleared = rr(out.state, "Renew", QUEUE, '{"session": "queue", "task": ""}', T0 + 3)
    assert cleared.state.owner == ALICE and cleared.events[-1].kind == "acquired"


def test_only_unattended_groups_declare_tasks():
    with pytest.raises(Refused, match="only holders of an unattended group \\(queue\\)"):
        rr(LockState(), "Acquire", ALICE, '{"session": "s", "task": "scan"}')
    with pytest.raises(Refused, match="only holders of an unattended group"):
        rr(held_by(ALICE), "Renew", ALICE, '{"session": "s", "task": "scan"}')
    with pytest.raises(Refused, match="\\(the config marks none\\)"):
        run(LockState(), "Acquire", QUEUE, '{"session": "q", "task": "scan"}')


def test_force_release_and_enable_give_the_lock_to_an_auto_first_in_line():
    s = rr(held_by(ALICE), "Request", BOB, "b").state
    out = rr(s, "ForceRelease", OPER, "hutch search", T0 + 1)
    assert [e.kind for e in out.events] == ["force-released", "acquired"]
    assert out.state.owner == BOB
    dis = rr(out.state, "Request", DAVE, "d", T0 + 2).state
    dis = rr(dis, "Disable", OPER, "maintenance", T0 + 3).state
    assert dis.mode == DISABLED and line(dis) == [(DAVE, "d")]
    assert rr(dis, "Request", DAVE, "d", T0 + 4).state.mode == DISABLED  # renewed
    on = rr(dis, "Enable", OPER, "", T0 + 5).state
    assert (on.owner, on.token) == (DAVE, 3)


def test_a_grant_removes_the_grantees_requests_and_the_holder_never_waits():
    s = rr(held_by(ALICE), "Request", BOB, "b1").state
    s = rr(s, "Request", BOB, "b2").state
    out = rr(s, "Handover", ALICE, '{"session": "s", "to": "bob", "to_session": "b2"}')
    assert (out.state.owner, out.state.session, out.state.waiters) == (BOB, "b2", ())
    with pytest.raises(Refused, match="matches several requests"):
        rr(s, "Handover", ALICE, '{"session": "s", "to": "bob"}')


def test_holder_index_and_user_map_for_the_acf():
    assert RANKED.users == ("bluesky", "alice", "bob", "dave", "carol", "operator")
    assert R.holder_index(LockState()) == 0
    assert R.holder_index(held_by(ALICE)) == 2 and R.holder_index(held_by(OPER)) == 6
    assert R.holder_index(rr(LockState(), "Disable", OPER, "x").state) == -1
    assert R.holder_index(LockState(HELD, "zed@x", "s", token=1, expiry=T0 + 1)) == -2
    other = parse({"groups": {"staff": {"users": ["bob", "alice"]}}}, base_dir=Path("/tmp"),
                  source="t")
    assert other.user_map != RANKED.user_map and 0 < other.user_map < 2 ** 31


def test_state_with_waiters_survives_a_round_trip_through_json():
    s = rr(held_by(QUEUE, text='{"session": "queue", "task": "scan"}'), "Request", ALICE,
           '{"session": "a", "note": "ü", "auto": false}', T0 + 1).state
    s = rr(s, "Request", BOB, "b", T0 + 2).state
    back = LockState.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and isinstance(back.waiters[0], Waiter)
    assert LockState.from_dict({"mode": "Free", "token": 3}) == LockState(token=3)


def test_expiry_chain_while_the_ioc_was_down_follows_the_order_things_ran_out():
    s = rr(held_by(ALICE, text='{"session": "s", "lease": 10}'), "Request", BOB,
           '{"session": "b", "lease": 20}').state
    s = rr(s, "Request", DAVE, '{"session": "d", "lease": 100}').state
    out = R.expire(s, T0 + 1000)
    # alice's lease ended at +10: bob (alive until +20) got it then, for 20 s, until +30;
    # then dave (alive until +100), for 100 s, until +130; then Free.
    assert [(e.kind, e.who) for e in out.events] == [
        ("expired", ALICE), ("acquired", BOB), ("expired", BOB), ("acquired", DAVE),
        ("expired", DAVE)]
    assert out.state == LockState(token=3)


# ---- invariants of requests and hand-over under random sequences ---------------------
RCALLERS = st.sampled_from([ALICE, BOB, DAVE, CAROL, QUEUE, OPER, NOBODY])
RSESSIONS = st.sampled_from(["s1", "s2", "queue"])
#: A step by whoever holds the lock now, under its session (else hand-overs are rare).
HOLDER, HOLDER_SESSION = "<holder>", "<session>"
REQUEST_TEXT = st.builds(
    lambda s, l, n, a: json.dumps({k: v for k, v in
                                   (("session", s), ("lease", l), ("note", n), ("auto", a))
                                   if v is not None}),
    RSESSIONS, st.one_of(st.none(), st.integers(1, 120)), st.one_of(st.none(), st.text(max_size=5)),
    st.one_of(st.none(), st.booleans()))
HANDOVER_TEXT = st.one_of(st.just(HOLDER_SESSION), st.builds(
    lambda s, to, ts, rq: json.dumps({k: v for k, v in (("session", s), ("to", to),
                                                        ("to_session", ts), ("requeue", rq))
                                      if v is not None}),
    st.just(HOLDER_SESSION),
    st.one_of(st.none(), st.sampled_from(["alice", "bob@ws2", "dave", "carol",
                                                     "operator", "bluesky", "zed"])),
    st.one_of(st.none(), RSESSIONS), st.one_of(st.none(), st.booleans())))
ACQUIRE_TEXT = st.one_of(RSESSIONS, st.builds(
    lambda s, l, t: json.dumps({k: v for k, v in (("session", s), ("lease", l), ("task", t))
                                if v is not None}),
    RSESSIONS, st.one_of(st.none(), st.integers(1, 60)),
    st.one_of(st.none(), st.sampled_from(["scan", ""]))))
#: Step kinds, weighted so that lines form and hand-overs happen.
RSTEPS = {
    "request": st.tuples(st.just("Request"), RCALLERS, REQUEST_TEXT),
    "holder-handover": st.tuples(st.just("Handover"), st.just(HOLDER), HANDOVER_TEXT),
    "handover": st.tuples(st.just("Handover"), RCALLERS, HANDOVER_TEXT),
    "holder": st.tuples(st.sampled_from(["Release", "Release", "Renew"]), st.just(HOLDER),
                        st.just(HOLDER_SESSION)),
    "acquire": st.tuples(st.sampled_from(["Acquire", "Renew"]), RCALLERS, ACQUIRE_TEXT),
    "leave": st.tuples(st.sampled_from(["Release", "Withdraw"]), RCALLERS, RSESSIONS),
    "operator": st.tuples(st.sampled_from(["ForceRelease", "Disable", "Enable"]), RCALLERS,
                          st.just("reason")),
    "tick": st.tuples(st.just("tick"), st.just(""), st.just("")),
}
WEIGHTS = {"request": 5, "holder-handover": 3, "handover": 1, "holder": 3, "acquire": 3,
           "leave": 1, "operator": 1, "tick": 1}
RSTEP = st.sampled_from([k for k, n in WEIGHTS.items() for _ in range(n)]).flatmap(
    lambda kind: st.tuples(RSTEPS[kind], st.floats(min_value=0, max_value=10)))


def _step(state: LockState, name: str, caller: str, text: str, now: float):
    """One step: a command or the clock's tick; the outcome, None if nothing changed
    (a refusal with no expiry found on the way)."""
    try:
        return R.expire(state, now) if name == "tick" else \
            R.command(name, state, caller, text.encode(), now)
    except Refused as exc:
        return exc.pending


def _check_fifo(before: LockState, out, *, named: bool) -> None:
    """FIFO within a level: a grant that is not a hand-over to a named waiter leaves
    nobody waiting who was ahead of the grantee (an outsider is behind everyone) at the
    same or a higher authority."""
    new = out.state
    if new.mode != HELD or not any(e.kind == "acquired" for e in out.events) or named:
        return
    keys = [(w.who, w.session) for w in R.ordered(before)]
    grantee = (new.owner, new.session)
    place = keys.index(grantee) if grantee in keys else len(keys)
    still = {(w.who, w.session) for w in new.waiters}
    for who, session in keys[:place]:
        assert (who, session) not in still or R._level(who) < R._level(new.owner), \
            f"{grantee} granted before {who} (session {session}), ahead in line"


def _check_line_invariants(state: LockState, now: float) -> None:
    keys = [(w.who, w.session) for w in state.waiters]
    assert len(keys) == len(set(keys)), "one request per identity and session"
    assert len(keys) <= MAX_WAITERS
    assert all(w.expiry > now for w in state.waiters), "no lapsed request waits"
    assert all(R.authority(w.who) is not None for w in state.waiters), "waiters are members"
    head = R.head(state)
    if state.mode == HELD:
        assert state.owner not in {w.who for w in state.waiters}, "the holder never waits"
        assert R.holder_index(state) >= 1
        assert state.acquired <= now + 1e-9 and state.expiry > now - 1e-9
        if head is not None and not state.task:
            assert R._level(head.who) <= R._level(state.owner), \
                "a higher authority waits only for a running task"
    else:
        assert (state.owner, state.session, state.task) == ("", "", "")
    if state.mode == FREE and head is not None:
        assert not head.auto, "a Free lock with an auto first in line is granted"
    assert (R.yield_to(state) != "") <= bool(state.task)


@settings(max_examples=400, deadline=None)
@given(st.lists(RSTEP, max_size=50))
def test_handover_invariants_hold_for_any_sequence(steps):
    """A hand-over never produces two holders; tokens strictly increase with every grant;
    no waiter is granted out of FIFO order within one authority level; the line stays
    consistent (one request per identity and session, none lapsed, the holder never in
    it, bounded)."""
    state, now = LockState(), T0
    for (name, caller, text), dt in steps:
        now += dt
        if caller == HOLDER:
            caller = state.owner or ALICE
        text = text.replace(HOLDER_SESSION, state.session or "s1")
        out = _step(state, name, caller, text, now)
        if out is None:
            continue
        new = out.state
        grants = [e for e in out.events if e.kind == "acquired"]
        tokens = [e.token for e in grants]
        assert tokens == list(range(state.token + 1, state.token + 1 + len(grants))), \
            "every grant is the next token"
        assert new.token == (tokens[-1] if tokens else state.token)
        if new.mode == HELD and (new.owner, new.session) != (state.owner, state.session):
            assert grants, "a new holder only with a grant"
        handed = [e for e in out.events if e.kind == "handed-over"]
        if handed:
            assert new.mode == HELD and new.owner != caller, "the lock changed hands once"
            assert f"to={new.owner} to_session={new.session} " in handed[0].detail
            assert (new.owner, new.session) in {(w.who, w.session) for w in state.waiters}
        _check_fifo(state, out, named=name == "Handover" and '"to"' in text)
        _check_line_invariants(new, now)
        state = new


MEMBERS = st.sampled_from([ALICE, BOB, DAVE, CAROL, QUEUE])


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(st.tuples(MEMBERS, RSESSIONS, st.booleans()), min_size=1,
                         max_size=MAX_WAITERS),
       ops=st.lists(st.tuples(st.sampled_from(["Release", "ForceRelease", "Acquire", "Request",
                                               "Withdraw", "Handover", "tick"]),
                              st.sampled_from([ALICE, BOB, DAVE, CAROL, QUEUE, OPER]),
                              RSESSIONS, st.floats(min_value=0, max_value=100)),
                    min_size=1, max_size=12))
def test_no_waiter_is_granted_out_of_fifo_order_within_a_level(requests, ops):
    """A line formed behind an operator, then every way the lock can change hands on its
    own or be taken (release, force-release, expiry, Acquire of a reserved lock, Request,
    withdrawal, a hand-over to the first in line): the order holds within each level."""
    state = held_by(OPER, text='{"session": "op", "lease": 400}')
    for i, (who, session, auto) in enumerate(requests):
        try:
            state = rr(state, "Request", who, json.dumps(
                {"session": session, "auto": auto, "lease": 600}), T0 + i).state
        except Refused:
            pass
    now = T0 + MAX_WAITERS
    for name, caller, session, dt in ops:
        now += dt
        if name in ("Release", "Handover"):
            caller, session = state.owner or caller, state.session or session
        text = "beam" if name == "ForceRelease" else session
        out = _step(state, name, caller, text, now)
        if out is None:
            continue
        _check_fifo(state, out, named=False)
        _check_line_invariants(out.state, now)
        state = out.state
