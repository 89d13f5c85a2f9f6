"""``portscope why``: its options."""

from __future__ import annotations

import argparse

from ..arguments import address as ip_address
from ..arguments import port_or_zero, port_range_value, text_value
from .common import add_filter_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    why = sub.add_parser(
        "why",
        help="would a bind to PORT succeed now? if not, who blocks it, under which rule",
        description="Check a bind() (or, with --listen, a listen()) against the namespace and "
                    "the sockets that exist now, with the kernel's own rules and in its order: "
                    "whether the address is the namespace's (EADDRNOTAVAIL), whether the port "
                    "needs CAP_NET_BIND_SERVICE (EACCES), which sockets take the port "
                    "(EADDRINUSE), owned by whom, why, and which changes would make it work. "
                    "Exit status 5 when it would fail.",
        epilog="examples:\n"
               "  portscope why 80                        could a server bind 0.0.0.0:80?\n"
               "  portscope why 8080 --reuseaddr          ... with SO_REUSEADDR\n"
               "  portscope why 443 --addr :: --v6only    an IPv6-only listener\n"
               "  portscope why 9000 --reuseport --user app   join a reuseport group as app\n"
               "  portscope why 0                         is any ephemeral port left?\n"
               "  portscope why 80 --user www-data        a privileged port, without the capability\n"
               "  portscope why 8443 --addr 10.0.0.9      an address this host may not have (yet)\n"
               "  portscope why 8080 --comm nginx         only the blockers nginx holds\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    why.add_argument("port", type=port_or_zero, metavar="PORT",
                     help="the port to bind (0: any ephemeral port)")
    why.add_argument("--addr", type=ip_address, help="the address to bind (default: the wildcard 0.0.0.0, "
                     "or :: with --ipv6)")
    why.add_argument("--ipv6", action="store_true", help="an IPv6 socket (implied by an IPv6 --addr)")
    why.add_argument("--udp", action="store_true", help="a UDP socket (default TCP)")
    why.add_argument("--reuseaddr", action="store_true", help="with SO_REUSEADDR")
    why.add_argument("--reuseport", action="store_true", help="with SO_REUSEPORT")
    why.add_argument("--v6only", action="store_true", help="with IPV6_V6ONLY")
    why.add_argument("--device", metavar="DEV", type=text_value("device"), help="with SO_BINDTODEVICE (name or index)")
    why.add_argument("--user", metavar="USER", type=text_value("user"), help="as this user (name or uid; default: "
                     "yours); matters for SO_REUSEPORT")
    why.add_argument("--listen", action="store_true",
                     help="ask about listen() on a socket already bound to the address")
    why.add_argument("--freebind", action="store_true",
                     help="with IP_FREEBIND: an address the namespace does not have is allowed")
    why.add_argument("--transparent", action="store_true",
                     help="with IP_TRANSPARENT (needs CAP_NET_ADMIN): any address is allowed")
    why.add_argument("--bind-address-no-port", action="store_true",
                     help="with IP_BIND_ADDRESS_NO_PORT: a bind to port 0 takes no port (it is "
                          "chosen at connect())")
    why.add_argument("--port-range", type=port_range_value, metavar="LO-HI",
                     help="with IP_LOCAL_PORT_RANGE (kernel 6.3+): port 0 picks in LO-HI "
                          "(within the namespace's range)")
    why.add_argument("--cgroup", metavar="PATH", type=text_value("cgroup"),
                     help="the cgroup2 path the process runs in, e.g. /system.slice/nginx.service "
                          "(default: portscope's own): BPF programs attached there or above "
                          "(cgroup/bind4, bind6, post_bind4, post_bind6) are named")
    why.add_argument("--cap-net-bind-service", action=argparse.BooleanOptionalAction,
                     default=None, help="whether the process has CAP_NET_BIND_SERVICE (default: "
                     "root has it, other users do not); matters below "
                     "net.ipv4.ip_unprivileged_port_start")
    why.add_argument("--all", action="store_true",
                     help="describe every blocker one by one (default: the first 100, the ones "
                          "processes hold first; all of them are counted in groups)")
    add_filter_options(why, netns_default="portscope's own", notes={
        "sport": "every blocker holds PORT, so only why 0 can use it",
        "dport": "a blocker's peer port (a TIME_WAIT or connected socket)",
        "uid": "a blocker's; --user is who would bind",
        "pid": "filters the blockers listed, never the verdict (as every filter: the bind "
               "fails whichever blockers are listed)",
        "netns": "given once: the namespace the bind is checked in"})
    why.add_argument("-v", "--verbose", action="store_true",
                     help="each blocker's holders with their command line and executable")
    why.add_argument("--json", action="store_true", help='{"verdict": "free"|"conflict"|'
                     '"refused", "errno", "reasons": [...], "blockers": [...], "blockers_total", '
                     '"blocker_groups": [...], "fixes": [...], "notes": [...]}: each reason, fix and note has a kind and its parameters '
                     'beside its sentence')
