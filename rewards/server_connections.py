"""How the reward server (:mod:`tempflow.rewards.server`) treats a connection before its request is read:
whether it gets one of the server's slots (:class:`Admission`), the 503 and lingering close of those that do not
(:class:`Refusals`, :func:`linger`), and reads that keep a deadline however steadily the bytes trickle in
(:class:`DeadlineReader`). Standard library only; nothing here knows HTTP beyond the 503 it writes."""

from __future__ import annotations

import collections
import io
import json
import math
import queue
import selectors
import socket
import threading
import time

# seconds the server reads (and drops) what a client it will not serve (503, 401) still sends after the answer
REFUSAL_TIMEOUT = 2.0
REFUSALS_LINGERING = 256  # refused connections read at once; past this they are closed right after their 503
_REFUSALS_POLL = 0.05  # seconds between looks for new refusals while lingering on others


class Admission:
    """Which connections get one of the server's ``slots``. A connection is unauthenticated until it shows the
    token (without a token: until its head is complete), and one address may have ``per_ip`` such connections.
    A connection that would be refused (its address at that limit, or every slot taken) instead takes the slot
    of the oldest unauthenticated connection (of its own address, at that limit) that has waited ``patience``
    seconds or more, and that one is closed: slow clients cannot keep prompt ones out, even from their own
    address. Only when none has waited that long is the newcomer refused (503)."""

    def __init__(self, slots: int, per_ip: int, patience: float):
        self.slots, self.per_ip, self.patience = slots, per_ip, patience
        self.peak = self.busy_refusals = self.address_refusals = self.evictions = 0
        self._lock = threading.Lock()
        self._in_use = 0
        self._unauthenticated = {}  # connection → (address, admitted at), oldest first
        self._per_ip = collections.Counter()
        self._handed_over = set()  # closed slow connections whose slot a newcomer took

    def admit(self, connection: socket.socket, address: str) -> str | None:
        """None once the connection has a slot; else the reason it is refused."""
        now = time.monotonic()
        with self._lock:
            if self._per_ip[address] >= self.per_ip:
                slow = self._slowest(now, address)
                if slow is None:
                    self.address_refusals += 1
                    return (f"{address} has {self.per_ip} connections that have not authenticated yet, the "
                            "server's limit per address; retry shortly")
                self._evict(slow)
            elif self._in_use < self.slots:
                self._in_use += 1
                self.peak = max(self.peak, self._in_use)
            elif (slow := self._slowest(now)) is not None:
                self._evict(slow)
            else:
                self.busy_refusals += 1
                return f"the server is serving its limit of {self.slots} connections; retry shortly"
            self._unauthenticated[connection] = (address, now)
            self._per_ip[address] += 1
        return None

    def authenticated(self, connection: socket.socket) -> None:
        """The connection showed the token (or, without one, sent its whole head): it can no longer be closed
        for a newcomer, nor does it count against its address."""
        with self._lock:
            self._forget(connection)

    def release(self, connection: socket.socket) -> None:
        """The connection ended: its slot is free, unless a newcomer took it over."""
        with self._lock:
            self._forget(connection)
            if connection in self._handed_over:
                self._handed_over.discard(connection)
            else:
                self._in_use -= 1

    def _slowest(self, now: float, address: str | None = None) -> socket.socket | None:
        for connection, (owner, admitted) in self._unauthenticated.items():
            if now - admitted < self.patience:
                return None  # oldest first: no later one has waited longer
            if address in (None, owner):
                return connection
        return None

    def _evict(self, connection: socket.socket) -> None:
        self._forget(connection)
        self._handed_over.add(connection)
        self.evictions += 1
        try:
            connection.shutdown(socket.SHUT_RDWR)  # its thread reads the end of the stream and finishes
        except OSError:  # closed already: its thread is finishing
            pass

    def _forget(self, connection: socket.socket) -> None:
        entry = self._unauthenticated.pop(connection, None)
        if entry is not None:
            address = entry[0]
            self._per_ip[address] -= 1
            if not self._per_ip[address]:
                del self._per_ip[address]


class Refusals:
    """Answers the connections the server will not serve: the 503 goes out at once from the accepting thread (a
    fresh connection's send buffer takes it whole), then one thread reads and drops what each client still sends
    (see :func:`linger`), all of them together, so that a slow client never holds up another's answer."""

    def __init__(self, name: str, budget: int):
        self._arrivals, self._budget = queue.SimpleQueue(), budget
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def refuse(self, connection: socket.socket, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            connection.setblocking(False)
            connection.sendall(head + body)
            connection.shutdown(socket.SHUT_WR)
        except OSError:  # the client is gone already
            connection.close()
            return
        self._arrivals.put(connection)

    def stop(self) -> None:
        self._arrivals.put(None)

    def _run(self) -> None:
        selector, lingering = selectors.DefaultSelector(), {}  # connection → [deadline, bytes left to read]
        while True:
            while True:  # new refusals: wait for one only when there is nothing to read
                try:
                    connection = self._arrivals.get(block=not lingering)
                except queue.Empty:
                    break
                if connection is None:
                    for connection in lingering:
                        connection.close()
                    return
                if len(lingering) >= REFUSALS_LINGERING:
                    connection.close()
                    continue
                lingering[connection] = [time.monotonic() + REFUSAL_TIMEOUT, self._budget]
                selector.register(connection, selectors.EVENT_READ)
            for key, _ in selector.select(_REFUSALS_POLL):
                state = lingering[key.fileobj]
                try:
                    chunk = key.fileobj.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                state[1] -= len(chunk)
                if not chunk or state[1] <= 0:
                    state[0] = 0.0  # done: closed below
            now = time.monotonic()
            for connection, (deadline, _) in list(lingering.items()):
                if now >= deadline:
                    selector.unregister(connection)
                    connection.close()
                    del lingering[connection]


def linger(connection: socket.socket, read, budget: int, seconds: float) -> None:
    """Lingering close after answering early: stop sending, then read (``read(n)``) and drop what the client still
    sends, up to ``budget`` bytes and ``seconds``, because closing with unread data resets the connection, and a
    reset can discard our answer before a client that is still writing its request reads it."""
    try:
        connection.shutdown(socket.SHUT_WR)
    except OSError:
        return
    deadline = time.monotonic() + seconds
    while budget > 0 and (left := deadline - time.monotonic()) > 0:
        try:
            connection.settimeout(left)
            chunk = read(min(budget, 1 << 16))
        except OSError:  # a timeout, a reset, or a socket that timed out before
            return
        if not chunk:
            return
        budget -= len(chunk)


class DeadlinePassed(TimeoutError):
    """A read found its deadline passed (a ``TimeoutError``, so that ``http.server`` treats it as one)."""


class DeadlineReader(io.RawIOBase):
    """The connection's bytes, each read waiting at most ``idle`` seconds and none running past ``deadline``
    (``time.monotonic()``): a socket timeout alone restarts with every byte, so a client trickling one byte
    a second would never reach it."""

    def __init__(self, connection: socket.socket, idle: float):
        self.connection, self.idle, self.deadline = connection, idle, math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlinePassed
        self.connection.settimeout(min(self.idle, left))
        try:
            return self.connection.recv_into(buffer)
        except TimeoutError:
            if time.monotonic() >= self.deadline:
                raise DeadlinePassed from None
            raise
