"""``portscope deliver``: its options."""

from __future__ import annotations

import argparse

from ..arguments import netns_spec, text_value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deliver",
        help="which socket would get a new connection (or datagram) to ADDR:PORT now, and why",
        description="Answer which socket the kernel would hand a new TCP connection (or, with "
                    "--udp, a datagram) to ADDR:PORT, in the kernel's own order: a TPROXY rule "
                    "(traffic from other hosts), the established table (with --from SRC:PORT), "
                    "the namespace's sk_lookup BPF programs (run on the packet where the kernel "
                    "allows: 5.14+), then the sockets bound to the address, then to the "
                    "wildcard, by score (a device-bound socket over an unbound one, IPv4 over "
                    "dual-stack IPv6), then the winner's reuseport group (by a hash of the "
                    "source, or by its BPF program). It names the sockets the winner wins over "
                    "and by which rule, and what can change the answer. Exit status 5 when no "
                    "socket would get it.",
        epilog="examples:\n"
               "  portscope deliver 10.0.0.5:443                 who gets a connection to 10.0.0.5:443\n"
               "  portscope deliver 10.0.0.5:443 --dev eth1      ... arriving on eth1\n"
               "  portscope deliver 127.0.0.1:53 --udp           who gets a datagram to port 53\n"
               "  portscope deliver [fd00::5]:80 --from [fd00::9]:40000\n"
               "                                                 that exact client's connection\n"
               "  portscope deliver 10.0.0.5:443 --netns blue --json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("destination", metavar="ADDR:PORT",
                   help="the destination: 10.0.0.5:443, [fd00::5]:443")
    p.add_argument("--udp", action="store_true", help="a UDP datagram (default: a TCP connection)")
    p.add_argument("--from", dest="source", metavar="SRC[:PORT]", type=text_value("source"),
                   help="the client's address, and port: an address of this namespace means a "
                        "local client (the packet arrives on lo); with a port, an open "
                        "connection of that 4-tuple gets it first")
    p.add_argument("--dev", metavar="IFACE", type=text_value("device"),
                   help="the device the packet arrives on (default: one no socket is bound to; "
                        "the sockets that win on a bound device are listed)")
    p.add_argument("--netns", type=netns_spec, metavar="N",
                   help="the network namespace: a name (ip netns), a path, an inode, or pid:PID "
                        "(default: portscope's own)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="the winner's holders with their command line and executable")
    p.add_argument("--json", action="store_true",
                   help='{"outcome": "socket"|"refused"|"not_local"|"nobody", "decided_by", '
                        '"socket", "reuseport", "others": [{"socket", "rule"}], "sk_lookup", '
                        '"tproxy", "devices", "changers", "notes"}')
