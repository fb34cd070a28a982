"""SSRF rules, without a network: which addresses and URLs are refused before any connection."""

from __future__ import annotations

import ipaddress

import pytest

from moderator.fetch import Fetcher, FetchPolicy, UrlBlocked, UrlInvalid, address_blocked, parse_networks


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1", "127.8.9.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
        "100.127.255.254", "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255", "192.0.2.1",
        "198.18.0.1", "240.0.0.1", "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:a00:1::", "64:ff9b::a9fe:a9fe",
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    ],
)  # fmt: skip
def test_special_addresses_are_blocked(ip):
    assert address_blocked(ipaddress.ip_address(ip)) is not None


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(ip):
    assert address_blocked(ipaddress.ip_address(ip)) is None


def test_named_networks_can_be_allowed():
    allow = parse_networks(["127.0.0.0/8"])
    assert address_blocked(ipaddress.ip_address("127.0.0.1"), allow) is None
    assert address_blocked(ipaddress.ip_address("::ffff:127.0.0.1"), allow) is None
    assert address_blocked(ipaddress.ip_address("10.0.0.1"), allow) is not None


@pytest.mark.parametrize(
    "url,error",
    [
        ("ftp://example.com/x.jpg", UrlInvalid),
        ("file:///etc/passwd", UrlInvalid),
        ("gopher://127.0.0.1:6379/_INFO", UrlInvalid),
        ("http://user:pw@example.com/x.jpg", UrlInvalid),
        ("http:///x.jpg", UrlInvalid),
        ("http://example.com:99999/x.jpg", UrlInvalid),
        ("http://127.0.0.1/x.jpg", UrlBlocked),
        ("http://[::1]:8080/x.jpg", UrlBlocked),
        ("http://169.254.169.254/latest/meta-data/", UrlBlocked),
        ("http://0x7f000001/x.jpg", UrlBlocked),
        ("http://2130706433/x.jpg", UrlBlocked),
        ("http://localhost/x.jpg", UrlBlocked),
        ("https://[::ffff:a00:1]/x.jpg", UrlBlocked),
    ],
)
def test_bad_urls_are_refused_before_connecting(url, error):
    with pytest.raises(error):
        Fetcher(FetchPolicy(timeout_s=1)).fetch(url)


def test_host_allowlist():
    f = Fetcher(FetchPolicy(allowed_hosts=("images.example.com", ".cdn.example.net")))
    assert f.check_url("https://images.example.com/a.jpg")[1] == "images.example.com"
    assert f.check_url("https://eu.cdn.example.net/a.jpg")[1] == "eu.cdn.example.net"
    with pytest.raises(UrlBlocked):
        f.check_url("https://evil.example.org/a.jpg")
    with pytest.raises(UrlBlocked):
        f.check_url("https://cdn.example.net.evil.org/a.jpg")
