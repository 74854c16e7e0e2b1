"""A command's monitor updates reach every client together, and the commanding client
before its put completes (issue 17).

The client here is caproto's sans-I/O CA client on a plain socket, so the test sees the
exact order of the messages the lock IOC sends on one circuit: what libca, and so the
lock's Python client, acts on.
"""
from __future__ import annotations

import socket
from collections import deque

import caproto as ca
import pytest

from epics_env import HOST, ME

FREE, HELD = 0, 1


class RawClient:
    """One CA circuit to the lock IOC, driven by hand."""

    def __init__(self, port: int, user: str = ME):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.circuit = ca.VirtualCircuit(ca.CLIENT, ("127.0.0.1", port), 0)
        self.send(ca.VersionRequest(priority=0, version=13), ca.HostNameRequest(HOST),
                  ca.ClientNameRequest(user))
        self.channels: dict[str, ca.ClientChannel] = {}
        self.subs: dict[int, str] = {}   # subscription id -> PV name
        self.received: deque = deque()

    def send(self, *commands) -> None:
        self.sock.sendall(b"".join(self.circuit.send(*commands)))

    def until(self, done) -> list:
        """The commands the IOC sent, in order, up to and including the first for which
        ``done(command)``."""
        seen = []
        while True:
            while not self.received:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("the IOC closed the circuit")
                commands, _ = self.circuit.recv(data)
                for command in commands:
                    self.circuit.process_command(command)
                    self.received.append(command)
            command = self.received.popleft()
            seen.append(command)
            if done(command):
                return seen

    def connect(self, name: str) -> ca.ClientChannel:
        chan = ca.ClientChannel(name, self.circuit)
        self.send(chan.create())
        self.until(lambda c: isinstance(c, ca.CreateChanResponse) and c.cid == chan.cid)
        self.channels[name] = chan
        return chan

    def subscribe(self, name: str) -> int:
        chan = self.channels.get(name) or self.connect(name)
        request = chan.subscribe(data_type=chan.native_data_type, data_count=0,
                                 mask=ca.SubscriptionType.DBE_VALUE)
        self.subs[request.subscriptionid] = name
        self.send(request)
        self.until(lambda c: isinstance(c, ca.EventAddResponse)
                   and c.subscriptionid == request.subscriptionid)
        return request.subscriptionid

    def put(self, name: str, text: str) -> list:
        """Put with callback; every command up to its reply (a WriteNotifyResponse, or
        the ErrorResponse of a failed put), the reply last."""
        chan = self.channels.get(name) or self.connect(name)
        request = chan.write(text.encode(), data_type=ca.ChannelType.CHAR,
                             data_count=len(text), notify=True)
        self.send(request)

        def reply(c) -> bool:
            if isinstance(c, ca.WriteNotifyResponse):
                return c.ioid == request.ioid
            return isinstance(c, ca.ErrorResponse) and \
                c.original_request.command == ca.WriteNotifyRequest.ID and \
                c.original_request.parameter2 == request.ioid
        return self.until(reply)

    def updates(self, commands) -> list[tuple[str, object]]:
        """(PV name, value) of the monitor updates among ``commands``, in order."""
        out = []
        for c in commands:
            if isinstance(c, ca.EventAddResponse) and c.subscriptionid in self.subs:
                if c.data_type == ca.ChannelType.CHAR:  # an empty text has no payload
                    data = bytes(c.data) if c.data_count else b""
                    value = data.split(b"\0", 1)[0].decode()
                else:
                    value = c.data[0]
                out.append((self.subs[c.subscriptionid], value))
        return out

    def close(self) -> None:
        self.sock.close()


WATCHED = ("State", "Owner", "Token", "Gate:staff", "Message")


@pytest.fixture
def clients(lock):
    made: list[RawClient] = []

    def make() -> RawClient:
        client = RawClient(lock.port)
        for suffix in WATCHED:
            client.subscribe(lock.pv(suffix))
        made.append(client)
        return client
    yield make
    for client in made:
        client.close()


def test_commanding_client_has_the_updates_before_its_put_completes(lock, clients):
    me = clients()
    pv = {s: lock.pv(s) for s in WATCHED}
    got = me.updates(me.put(lock.pv("Acquire"), "burst"))
    names = [name for name, _ in got]
    assert dict(got)[pv["State"]] == HELD
    assert dict(got)[pv["Owner"]] == f"{ME}@{HOST}"
    assert dict(got)[pv["Token"]] == 1
    assert dict(got)[pv["Gate:staff"]] == 0  # held by ME, who is not staff
    assert sorted(names) == sorted(pv.values()), "each changed PV once, nothing else"
    assert names[-1] == pv["Message"] and dict(got)[pv["Message"]].startswith(
        "granted to"), "Message comes after every state PV of the outcome"

    got = me.updates(me.put(lock.pv("Release"), "burst"))
    assert dict(got)[pv["State"]] == FREE and dict(got)[pv["Owner"]] == ""
    assert [name for name, _ in got][-1] == pv["Message"]


def test_a_refusal_is_said_in_message_before_the_put_fails(lock, clients):
    me = clients()
    commands = me.put(lock.pv("Release"), "nothing-held")
    assert isinstance(commands[-1], ca.ErrorResponse), "the put failed"
    got = me.updates(commands)
    assert [name for name, _ in got] == [lock.pv("Message")], "no state PV is sent"
    assert "refused" in got[0][1]
    errors = [c for c in commands if isinstance(c, ca.ErrorResponse)]
    assert b"refused" in errors[0].error_message, "caput -c shows the reason"


def test_every_client_gets_the_same_burst_in_the_same_order(lock, clients):
    me, others = clients(), [clients() for _ in range(5)]
    mine = me.updates(me.put(lock.pv("Acquire"), "burst"))
    for other in others:
        got = other.updates(other.until(lambda c: isinstance(c, ca.EventAddResponse) and
                                        other.subs.get(c.subscriptionid) ==
                                        lock.pv("Message")))
        assert got == mine


def test_a_subscription_with_a_channel_filter_still_gets_updates(lock, clients):
    """Filtered subscriptions (here an array filter) take caproto's own path."""
    me = clients()
    me.subscribe(lock.pv("Owner") + ".[0:2]")
    got = me.updates(me.put(lock.pv("Acquire"), "burst"))
    assert (lock.pv("Owner") + ".[0:2]", ME[:3]) in got


CLIENT = """
import os
from beamline_lock.client import BeamlineLock, LockNotHeld
reads = []
read = BeamlineLock._read
def counted(self, suffix):
    reads.append(suffix)
    return read(self, suffix)
BeamlineLock._read = counted
lock = BeamlineLock(os.environ["LOCK_PREFIX"], session="burst", lease=60, timeout=10)
for step, command in (("acquire", lambda: lock.acquire()),
                      ("renew", lambda: lock.renew()),
                      ("release", lambda: lock.release()),
                      ("disable", lambda: lock.disable("maintenance")),
                      ("enable", lambda: lock.enable("done"))):
    del reads[:]
    st = command()
    print(step, st.state, st.token, "reads", reads)
del reads[:]
try:
    lock.release()
except LockNotHeld:
    print("refused reads", reads)
"""


def test_the_client_confirms_from_its_monitors_without_reading_back(net, lock):
    """The Python client relies on the burst order: no CA read after a granted command
    (a refusal still reads its reason)."""
    import subprocess
    import sys
    env = dict(net.client_env(), LOCK_PREFIX=lock.prefix)
    r = subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True,
                       text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[:5] == ["acquire Held 1 reads []", "renew Held 1 reads []",
                         "release Free 1 reads []", "disable Disabled 1 reads []",
                         "enable Free 1 reads []"], r.stdout
    assert lines[5] == "refused reads ['Message']", r.stdout
