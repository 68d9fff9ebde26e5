"""Connections over TCP sockets, shared by the tcp transport (its data and replies) and
the mooncake transport (its control channel); each brings its own frames.

In a request's life: the decode rank's receiver listens at the endpoint its reservation
hands out, and a thread per accepted connection hands each frame to the transport
(at most `max_connections` of them: at the cap, the oldest connection with no transfer
in progress is closed to make room, else the new one is; a transport may give its
reads deadlines, `recv_exact(..., deadline)`, woken every `rcv_poll` to check them);
the prefill rank's sender connects on its first frame to that endpoint, writes frames
from a writer thread (the sender book's queue) and reads the receiver's replies on a
reader thread. Whatever ends a connection fails the transfers it carried, through the
receiver's or the sender's book.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

from .common import ConnFail
from .receiver_book import BookedReceiver, RxConn
from .sender_book import BookedSender, TxConn


class Corrupt(Exception):
    """The byte stream of a connection cannot be trusted any more."""


class Lost(Exception):
    """The peer went away (EOF inside a frame, reset)."""


def set_sndtimeo(sock: socket.socket, seconds: float) -> None:
    """Kernel send timeout on a blocking socket: a stalled send returns (partial count
    or EAGAIN) instead of blocking for ever, while full-speed sends stay in C."""
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, int((seconds - sec) * 1e6)))


def dial(addr: tuple[str, int], endpoint: str, timeout: float) -> socket.socket:
    """A TCP connection to `addr` made within `timeout`; ConnFail (timeout, refused,
    peer_lost) if it cannot be made."""
    try:
        return socket.create_connection(addr, timeout=timeout)
    except socket.timeout:
        raise ConnFail("timeout", f"connect to {endpoint} timed out") from None
    except ConnectionRefusedError:
        raise ConnFail("refused", f"connection to {endpoint} refused") from None
    except OSError as e:
        raise ConnFail("peer_lost", f"connect to {endpoint}: {e}") from None


def connect(addr: tuple[str, int], endpoint: str, timeout: float, deadline: float | None, sndtimeo: float) -> socket.socket:
    """A blocking TCP_NODELAY connection to `addr`, made within `timeout` and the
    frame's `deadline` (but given 50 ms at least), whose sends wake every `sndtimeo`;
    ConnFail (timeout, refused, peer_lost) if it cannot be made."""
    limit = timeout
    if deadline is not None:
        limit = max(0.05, min(limit, deadline - time.monotonic()))
    sock = dial(addr, endpoint, limit)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_sndtimeo(sock, sndtimeo)
    return sock


def set_rcvtimeo(sock: socket.socket, seconds: float) -> None:
    """Kernel receive timeout on a blocking socket: a recv with nothing to read wakes
    (EAGAIN) this often, so its caller can check a deadline; full-speed reads stay in C."""
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, int((seconds - sec) * 1e6)))


def check_deadline(deadline: float | None, what: str) -> None:
    """ConnFail("timeout") once `deadline` (time.monotonic()) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise ConnFail("timeout", what)


def recv_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill `view` from the socket by `deadline` (a socket with a receive timeout wakes
    to check it); Lost if the peer closes first, ConnFail("timeout") past the deadline."""
    got, n = 0, view.nbytes
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        except (BlockingIOError, InterruptedError):
            check_deadline(deadline, "the sender did not send a whole frame in time")
            continue
        if k == 0:
            raise Lost("connection closed inside a frame")
        got += k


def recv_header(sock: socket.socket, hdr: memoryview, idle_deadline: float | None = None, frame_s: float = 0.0) -> bool:
    """Read the next frame's fixed-size header into `hdr`; False on a clean EOF between
    frames (the peer closed the connection), Lost on one inside the header. With an
    `idle_deadline`, ConnFail("timeout") if no frame begins by then, or the header is
    not whole `frame_s` seconds after it began."""
    while True:
        try:
            k = sock.recv_into(hdr, hdr.nbytes, socket.MSG_WAITALL)
            break
        except (BlockingIOError, InterruptedError):
            check_deadline(idle_deadline, "idle connection: no frame within the idle timeout")
    if k == 0:
        return False
    if k < hdr.nbytes:
        recv_exact(sock, hdr[k:], None if idle_deadline is None else time.monotonic() + frame_s)
    return True


class SocketRConn(RxConn):
    """An accepted connection; its thread is the only one reading from it or replying."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        super().__init__(name)
        self.sock = sock
        self.thread: threading.Thread | None = None
        self._sock_lock = threading.Lock()  # shutdown (any thread) vs close (its thread)
        self._closed = False
        self.started = time.monotonic()
        self.idle = True  # between frames (its thread sets it): may be closed to make room
        self.evicted = False  # closed to make room (book lock)

    def shut(self) -> None:
        with self._sock_lock:
            if not self._closed:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._sock_lock:
            if not self._closed:
                self._closed = True
                self.sock.close()


class SocketReceiver(BookedReceiver):
    """A receiver that takes sender connections (`_rconn`, a SocketRConn class) on a
    TCP listener, with a thread each that hands the connection's frames to `_handle(c)`
    (False: a clean end between frames) until it ends; then the transfers with frames
    open on it fail. Replies (ACK, ERROR, ...) that the sender does not read within
    `_reply_timeout` end the connection. At most `_max_connections` are open (None: no
    cap); with `_rcv_poll`, reads wake that often to check the transport's deadlines."""

    _rconn: type[SocketRConn]
    _listener: socket.socket
    _endpoint: str
    _reply_timeout: float
    _max_connections: int | None = None
    _rcv_poll: float | None = None
    refused_connections = 0  # connections closed at once, or closed to make room (a counter)

    def _start_accepting(self, name: str, conn_name: str) -> None:
        """Start the accept thread `name`; connection threads are `conn_name`-<peer port>."""
        self._conns: set[SocketRConn] = set()
        self._closed = False
        self._listener.settimeout(0.2)  # the accept loop notices close within this
        self._acceptor = threading.Thread(target=self._accept_loop, args=(conn_name,), name=name, daemon=True)
        self._acceptor.start()

    def close(self) -> None:
        with self._book.lock:
            if self._closed:
                return
            self._closed = True
        self._book.close()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
        except OSError:
            pass
        self._acceptor.join(timeout=2.0)  # else it notices `_closed` within its 0.2 s timeout
        self._listener.close()
        with self._book.lock:
            conns = list(self._conns)
        for c in conns:
            c.shut()
        for c in conns:
            if c.thread is not None:
                c.thread.join(timeout=2.0)
            c.close()

    def _accept_loop(self, conn_name: str) -> None:
        while not self._closed:
            try:
                sock, addr = self._listener.accept()
            except (socket.timeout, BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            sock.setblocking(True)
            if not self._make_room():
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_sndtimeo(sock, self._reply_timeout)  # a peer that never reads replies cannot block the connection's thread
            if self._rcv_poll:
                set_rcvtimeo(sock, self._rcv_poll)  # reads wake to check the idle and frame deadlines
            c = self._rconn(sock, f"{addr[0]}:{addr[1]}->{self._endpoint}")
            c.thread = threading.Thread(target=self._serve, args=(c,), name=f"{conn_name}-{addr[1]}", daemon=True)
            with self._book.lock:
                if self._closed:
                    c.close()
                    return
                self._conns.add(c)
            c.thread.start()

    def _make_room(self) -> bool:
        """Below the connection cap, or made room by closing the oldest connection
        that is between frames with no transfer open on it (it ends at once; an honest
        sender reconnects on its next frame). False: refuse the new connection."""
        if self._max_connections is None:
            return True
        with self._book.lock:
            if sum(not c.evicted for c in self._conns) < self._max_connections:
                return True
            idle = [c for c in self._conns if c.idle and not c.open and not c.evicted]
            self.refused_connections += 1
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c.started)
            oldest.evicted = True  # counted out now: its thread ends as soon as the shutdown wakes it
        oldest.shut()
        return True

    def _serve(self, c: SocketRConn) -> None:
        kind, detail = "peer_lost", f"sender connection {c.name} closed"
        try:
            while self._handle(c):
                pass
        except Corrupt as e:
            kind, detail = "corrupt", f"{e} on {c.name}"
        except ConnFail as e:
            kind, detail = e.kind, f"{e.detail} on {c.name}"
        except (Lost, OSError) as e:
            detail = f"{e or type(e).__name__} on {c.name}"
        finally:
            try:
                self._release(c)
                c.shut()
                c.close()
                self._book.drop_conn(c, kind, detail)
            finally:
                # last: until its cleanup is done the connection stays where close() finds
                # (and joins) it; a connection its sender ended just before close() was
                # otherwise left running behind it
                with self._book.lock:
                    self._conns.discard(c)

    def _handle(self, c: SocketRConn) -> bool:
        raise NotImplementedError

    def _release(self, c: SocketRConn) -> None:
        """The connection `c` ended: give back what it holds, before its transfers fail."""


class SocketSConn(TxConn):
    """A sender's connection to `addr`: made by its writer thread on the first item,
    with a reader thread for the receiver's replies; threads are named after `label`."""

    def __init__(self, endpoint: str, lock: threading.Lock, addr: tuple[str, int], label: str) -> None:
        super().__init__(endpoint, lock)
        self.addr = addr
        self.label = label
        self.sock: socket.socket | None = None
        self.reader: threading.Thread | None = None
        self.sock_lock = threading.Lock()  # shutdown (any thread) vs close (writer)

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def shut(self) -> None:
        with self.sock_lock:
            if self.sock is not None and self.sock.fileno() >= 0:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class SocketSender(BookedSender):
    """A sender whose connections are SocketSConns: the writer thread (BookedSender)
    connects, and starts a reader thread that hands the receiver's replies to
    `_read_reply(c)` (False: the receiver closed the connection between frames).
    Whatever ends either thread kills the connection, failing the transfers it
    carries. Sends wake every `_sndtimeo` to check their deadline; threads are named
    `_thread_names` (writer, reader) prefixes."""

    _sconn: type[SocketSConn]
    _connect_timeout: float
    _sndtimeo: float
    _thread_names: tuple[str, str]

    def _new_conn(self, endpoint: str) -> SocketSConn:
        c = self._sconn(endpoint, self._book.lock)
        return self._start_writer(c, f"{self._thread_names[0]}-{c.label}")

    def _writer_done(self, c: SocketSConn) -> None:
        c.shut()  # also when it was killed while connecting, before it had a socket
        if c.reader is not None:
            c.reader.join(timeout=2.0)
        with c.sock_lock:
            if c.sock is not None:
                c.sock.close()

    def _connect(self, c: SocketSConn, deadline: float | None) -> None:
        sock = connect(c.addr, c.endpoint, self._connect_timeout, deadline, self._sndtimeo)
        with c.sock_lock:
            c.sock = sock
        c.reader = threading.Thread(target=self._read_loop, args=(c,), name=f"{self._thread_names[1]}-{c.label}", daemon=True)
        c.reader.start()
        if c.dead:  # killed while connecting
            raise ConnFail("aborted", "connection closed while connecting")

    def _read_loop(self, c: SocketSConn) -> None:
        kind, detail = "peer_lost", "receiver closed the connection"
        try:
            while self._read_reply(c):
                pass
        except Corrupt as e:
            kind, detail = "corrupt", str(e)
        except (Lost, OSError) as e:
            detail = f"{e or type(e).__name__}"
        self._book.kill(c, kind, f"{detail} ({c.endpoint})")

    def _read_reply(self, c: SocketSConn) -> bool:
        raise NotImplementedError

