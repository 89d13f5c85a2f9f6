"""The record layer: the typed records that cross from one part of
portscope to another, each with one JSON codec and, where the journal
keeps it, one row codec.

Sources make records: the probes' ring buffer (tracer/events.decode), the
inventory (tracer/inventory.Socket.record), the group watcher, the
explainer, the journal's reader and the JSON-lines recordings. Sinks read
them: the state model and the terminal UI, the journal writer, the
exporter, the report's rules and the printers. Neither side needs the
other's code, only these shapes:

========================  =====================================================
module                    records
========================  =====================================================
``vocabulary``            the kernel's names (families, protocols, TCP states,
                          options, errnos) and how an endpoint is written
``calls``                 :class:`CallEvent` (a traced call, its capture of the
                          blockers), :class:`RecordedCall` (as the journal
                          keeps it)
``sockets``               :class:`Owner`, :class:`SocketRecord` (a socket
                          state as a snapshot keeps it), :class:`RecordedSnapshot`
``explanations``          :class:`Reason`, :class:`Fix`, :class:`Note`,
                          :class:`BlockerSummary`, :class:`EventExplanation`
``groups``                :class:`Group`, :class:`Member`, :class:`Acceptor`,
                          :class:`MemberEvent`, :class:`GroupsReading`
``findings``              :class:`Finding` (what the hijack rules found)
========================  =====================================================
"""

from .calls import EVENT_COLUMNS, CallEvent, Capture, Captured, Options, RecordedCall
from .explanations import HELD_WHO, BlockerSummary, EventExplanation, Fix, Note, Reason
from .findings import Finding
from .groups import Acceptor, Group, GroupsReading, Member, MemberEvent, reading_from_json
from .sockets import (
    SOCKET_COLUMNS,
    Owner,
    RecordedSnapshot,
    SocketRecord,
    owner_detail,
    owner_label,
    owners_text,
)
from .vocabulary import (
    FAMILIES,
    OPTION_NAMES,
    PROTOCOLS,
    TCP_STATES,
    address_of_family,
    errno_name,
    format_addr,
    split_endpoint,
)

__all__ = [
    "EVENT_COLUMNS", "FAMILIES", "HELD_WHO", "OPTION_NAMES", "PROTOCOLS", "SOCKET_COLUMNS",
    "TCP_STATES", "Acceptor", "BlockerSummary", "CallEvent", "Capture", "Captured", "EventExplanation",
    "Finding", "Fix", "Group", "GroupsReading", "Member", "MemberEvent", "Note", "Options",
    "Owner", "Reason", "RecordedCall", "RecordedSnapshot", "SocketRecord", "address_of_family",
    "errno_name", "format_addr", "owner_detail", "owner_label", "owners_text", "reading_from_json",
    "split_endpoint",
]
