"""The one launcher of the stack (``demo/services.py``): its port probe, and a service
described with what the remote half needs (a TLS certificate made at first start, a config
rendered into its work dir, an HTTPS readiness check, its own OS account), run for real
(Debian's nginx)."""
from __future__ import annotations

import socket
import ssl
import urllib.request
from pathlib import Path

import pytest

from demo import services
from epics_env import LockIOC, free_port, user_dir


def _tcp_states(port: int) -> set[str]:
    """States (hex, as /proc/net/tcp has them) of the TCP sockets bound to ``port``."""
    states = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            states.add(fields[3])
    return states


def test_a_port_in_time_wait_is_free_and_a_listening_one_is_not():
    """`make demo` again within a minute of stopping said `port(s) in use` while nothing
    listened: the probe bound without SO_REUSEADDR, which every server we run sets."""
    port = free_port()
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        assert not services.port_free(port)             # a listener: busy
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()                                    # the server closes first ...
        assert client.recv(16) == b""
        client.close()
    assert "06" in _tcp_states(port)                    # ... so its end is in TIME-WAIT
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))                 # what the old probe did: "busy"
    assert services.port_free(port)                     # a server can listen: free


def test_an_https_service_under_its_own_account_with_a_cert_made_at_first_start():
    work = user_dir(None, "stack")
    work.chmod(0o711)
    port = free_port()
    tls = services.SelfSignedCert(work / "tls" / "cert.pem", work / "tls" / "key.pem")
    servers = (f"server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {tls.cert}; "
               f"ssl_certificate_key {tls.key}; location / {{ return 200 'hello\\n'; }} }}")
    url = f"https://127.0.0.1:{port}/"

    def describe() -> services.Service:
        return services.nginx(work / "nginx", servers, {"https": port},
                              services.http_ready(url, ca_file=tls.cert), tls=tls)

    stack = services.Stack(work)
    try:
        front = stack.start(describe())                 # waits for the HTTPS answer
        assert (work / "nginx" / "nginx.conf").read_text().count(str(work)) >= 5
        pids = services.group_pids(front.proc.pid)
        assert len(pids) >= 2                           # runuser, master, worker
        assert {services.process_owner(pid) for pid in pids if pid != front.proc.pid} == {"www-data"}
        verified = ssl.create_default_context(cafile=str(tls.cert))
        with urllib.request.urlopen(url, context=verified, timeout=5) as answer:
            assert answer.read() == b"hello\n"
        with pytest.raises(OSError):                    # not trusted without the cert
            urllib.request.urlopen(url, timeout=5)
        cert = tls.cert.read_bytes()

        stack.stop()
        assert services.group_pids(front.proc.pid) == []             # nothing of it left
        assert services.port_free(port)
        again = stack.start(describe())
        assert tls.cert.read_bytes() == cert            # made once, kept
        assert again.running()
    finally:
        stack.stop()


def test_a_killed_server_gets_its_port_back_whatever_else_binds_meanwhile(net, tmp_path):
    """``lock.kill9()`` then ``lock.start()`` failed now and then with ``OSError: [Errno 98]
    Address already in use`` on the lock IOC's CA port. Root cause: while a server is down
    its port is free for anyone on the machine. Our ports come from the kernel's ephemeral
    range, which is where the kernel binds every client socket (a CA client's UDP search
    socket, the CA repeater's socket for each client, a TCP connection's local end), and
    the CA repeater and other test runs bind free ports explicitly (the repeater's bind test
    of a client's port, ``free_port``'s probe). Whoever holds the port when the server
    binds it again wins. Here a bystander binds it, deterministically, as any of them may:
    the launcher must hold the port from the kill until the server answers again."""
    ioc = LockIOC(net, tmp_path).start()
    bystanders = []
    try:
        ioc.kill9()
        refused = []
        for kind, where in ((socket.SOCK_DGRAM, "0.0.0.0"), (socket.SOCK_DGRAM, "127.0.0.1"),
                            (socket.SOCK_STREAM, "127.0.0.1")):
            bystander = socket.socket(socket.AF_INET, kind)
            bystanders.append(bystander)
            try:
                bystander.bind((where, ioc.port))
            except OSError:
                refused.append((kind, where))
        ioc.start()                         # was: lock IOC exited with 1 ... [Errno 98]
        assert net.caget(ioc.pv("State")) == "Free"
        assert len(refused) == 3, refused   # nobody else got the port while it was down
    finally:
        for bystander in bystanders:
            bystander.close()
        ioc.stop()
