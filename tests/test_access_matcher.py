"""Property tests for the SMTP firewall's matchers (policy/access.py)."""

from __future__ import annotations

import fnmatch
import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from postwarden.policy.access import Pattern, _in, client_address

v4 = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)
v6 = st.integers(min_value=0, max_value=2**128 - 1).map(ipaddress.IPv6Address)


def inside(addr: int, net: int, prefix: int, bits: int) -> bool:
    """An independent oracle: the first ``prefix`` bits are equal."""
    shift = bits - prefix
    return (addr >> shift) == (net >> shift)


@settings(max_examples=500)
@given(v4, v4, st.integers(min_value=0, max_value=32))
def test_ipv4_cidr_membership(addr: ipaddress.IPv4Address, base: ipaddress.IPv4Address,
                              prefix: int) -> None:
    net = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    assert _in(addr, [net]) == inside(int(addr), int(base), prefix, 32)


@settings(max_examples=500)
@given(v6, v6, st.integers(min_value=0, max_value=128))
def test_ipv6_cidr_membership(addr: ipaddress.IPv6Address, base: ipaddress.IPv6Address,
                              prefix: int) -> None:
    net = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    assert _in(addr, [net]) == inside(int(addr), int(base), prefix, 128)


@given(v4, st.integers(min_value=0, max_value=32))
def test_ipv4_mapped_clients_match_ipv4_lists(addr: ipaddress.IPv4Address, prefix: int) -> None:
    net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    mapped = client_address(f"::ffff:{addr}")
    assert mapped == addr and mapped is not None and _in(mapped, [net])
    # An IPv4 network never matches a (non-mapped) IPv6 client, and vice versa.
    assert not _in(ipaddress.IPv6Address(int(addr)), [net])


_glob_chars = st.sampled_from(list("abcxyz.-@*?"))
_value_chars = st.sampled_from(list("abcxyzABC.-@"))


@settings(max_examples=500)
@given(st.text(_glob_chars, min_size=1, max_size=12), st.text(_value_chars, max_size=16))
def test_globs_match_like_fnmatch_on_the_whole_value(glob: str, value: str) -> None:
    assert Pattern(glob).matches(value) == fnmatch.fnmatchcase(value.lower(), glob.lower())


def test_glob_is_anchored_and_regex_is_searched() -> None:
    assert Pattern("bad.example").matches("BAD.example")
    assert not Pattern("bad.example").matches("notbad.example")
    assert Pattern("*@spam.example").matches("x@spam.example")
    assert Pattern("/spam/").matches("x@myspamhost.example")
