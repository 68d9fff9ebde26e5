"""The `collective` transport: KV byte ranges over torch.distributed point-to-point
(gloo on CPU, NCCL on CUDA, HCCL on Ascend) between two independent instances.

No default process group is used or created: the two sides of every connection build
a private two-rank group straight from a PrefixStore of a TCPStore the receiver hosts,
so a node's own groups (TP, PCP) are never touched and two nodes can share a host.

Connection (one per sender and endpoint, made lazily by the sender's writer thread)
  1. the receiver hosts TCPStore(host, port 0); its endpoint is "host:port"
  2. the sender takes a pair id, `store.add(NS/pairs, 1)`, and posts NS/hello/<pair> =
     "<version> <device type>"; the receiver's accept thread answers NS/reply/<pair>
     "ok" (or "refused <why>": another protocol version or device type)
  3. both build the group on PrefixStore(NS/pair/<pair>): sender rank 0, receiver rank
     1; the backend follows the region's device (torch_npu is imported only for NPU)

Life of one transfer (see base.py)
  1. decode   receiver.expect(tid, ranges, deadline)
  2. prefill  sender.send(tid, ep, pieces, deadline) queues a DATA frame on the
     connection to `ep`; its writer thread sends header, piece table, and the payload:
     large pieces as views of the source region cut in `chunk`-byte messages, small
     ones (KV blocks) packed into `chunk`-byte messages; a window in flight
  3. the receiver's thread for the connection checks the header and that every piece
     lies inside tid's ranges, then posts recvs straight into views of the destination
     region (a packed message into staging, copied out while the transfer is live); a
     frame it will not land goes into scratch
  4. sender.finish(tid, ep, trailer) queues FINISH; the receiver reaches it after every
     earlier frame of the connection is in memory and acknowledges through the store
     (NS/ack/<pair>/<k> = "<tid> ok" or "<tid> <kind> <detail>", k = 0, 1, ...), which
     an ack thread of the sender consumes in order
  5. sender.wait or sender.poll, and receiver.poll, as in base.py; data frames of a
     transfer that failed or was cancelled here land in scratch, and the sender is
     told once (an ack entry with the error), so it drops the rest before `finish`

The frame format, how a payload is cut into messages, and the pair groups are in
collective_wire.py; the receiver in collective_receiver.py, the sender in
collective_sender.py; their transfers' state in the receiver's and sender's books
(receiver_book.py, sender_book.py), shared with the tcp and mooncake transports.

Failures, as TransferError kinds (the same as the tcp transport)
  corrupt    a bad header: the connection is closed and the transfers with frames open
             on it fail; a piece outside the expected ranges fails its transfer and its
             payload lands in scratch
  peer_lost  the group or the store failed (a dead peer closes its sockets at once)
  timeout    receiver: not complete at its deadline; sender: a frame did not go out by
             its deadline (the connection is closed: a frame is sent whole or not at all)
  refused    connecting refused; FINISH for a transfer the receiver does not know
  aborted    sender.abort, receiver.cancel, close
Every wait on the group has a timeout (collective_wire.py tells which), so a dead or
stalled peer ends in one of these, never a hang.
"""
from __future__ import annotations

from .collective_receiver import CollectiveReceiver
from .collective_sender import CollectiveSender
from .collective_wire import plan_messages

__all__ = ["CollectiveReceiver", "CollectiveSender", "plan_messages"]
